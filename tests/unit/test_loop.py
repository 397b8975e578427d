"""The loop's arithmetic: gradient accumulation is the same step as one big batch; the schedule's shape."""

from __future__ import annotations

import pytest

from orchestrator.config import compose_config, finalize
from orchestrator.run.planning import resolve_data
from tests.helpers import LLAMA_TINY
from trainers.config import OptimConfig
from trainers.loop import Trainer
from trainers.optim import lr_multiplier


class SoloContext:
    """A one-process WorkerContext."""

    rank = local_rank = 0
    world_size = 1

    def report(self, metrics, step):
        pass

    def should_stop(self):
        return False


pytestmark = pytest.mark.usefixtures("process_group")


def losses(tmp_path, micro_batch: int, steps: int = 3) -> list[float]:
    cfg = finalize(
        compose_config(
            [
                *LLAMA_TINY,
                "cluster.num_workers=1",
                "train.global_batch=4",
                f"train.micro_batch={micro_batch}",
                f"storage.root={tmp_path}",
                "optim.warmup_steps=0",
                "tracker=none",
            ]
        )
    )
    resolve_data(cfg, log=lambda m: None)
    trainer = Trainer(cfg, SoloContext())
    assert trainer.grad_accum == 4 // micro_batch
    per_step = []
    for _ in range(steps):
        trainer.train_step()
        per_step.append(float(trainer.window.loss))  # the step's mean loss, left on the device until read
    return per_step


def test_gradient_accumulation_matches_one_big_batch(tmp_path, cache_dir):
    whole = losses(tmp_path / "a", micro_batch=4)
    for micro in (2, 1):
        accumulated = losses(tmp_path / f"m{micro}", micro_batch=micro)
        assert accumulated == pytest.approx(whole, rel=1e-5)
    assert whole[-1] < whole[0]


def test_warmup_then_cosine_to_min_ratio():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.55)
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(500, cfg, 110) == pytest.approx(0.1)
