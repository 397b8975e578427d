"""task=mlm under every kind of strategy: a BERT trains to the same losses under DDP, FSDP2 and DeepSpeed
ZeRO, and a run resumed on another world size masks every row as the uninterrupted run did.

Each run is 8 steps of a tiny BERT on the built-in corpus, 2 torchrun workers, fp32, no dropout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY, rows, runs_per_strategy, torchrun

pytestmark = pytest.mark.slow

MLM = [*TINY, "task=mlm", "model=bert_tiny", "tracker=none", "train.max_steps=8", "train.checkpoint_every=4"]
STRATEGIES = ["ddp", "fsdp", "zero2"]


@pytest.fixture(scope="module")
def mlm_runs(tmp_path_factory, cache_dir):
    """strategy -> folder of its finished 8-step MLM run (each trained once per module)."""
    return runs_per_strategy(tmp_path_factory.mktemp("mlm"), *MLM)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows(run_dir) if "train/loss" in r}


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_mlm_losses_agree_with_ddp(mlm_runs, strategy):
    reference, found = losses(mlm_runs("ddp")), losses(mlm_runs(strategy))
    assert sorted(found) == list(range(1, 9))
    for step, loss in found.items():
        assert loss == pytest.approx(reference[step], rel=1e-4), step
    accuracy = [r["val/mlm_accuracy"] for r in rows(mlm_runs(strategy)) if "val/mlm_accuracy" in r]
    assert len(accuracy) == 2 and all(0 <= a <= 1 for a in accuracy)


def test_a_resume_on_one_worker_masks_as_the_two_worker_run(mlm_runs, tmp_path):
    """The masks come from each row's stream position, not from a per-rank generator: one worker accumulating
    two micro-batches draws the masks two workers drew, so only float rounding separates the curves (another
    mask would move the loss by percents)."""
    run_dir = tmp_path / "ddp"
    shutil.copytree(mlm_runs("ddp"), run_dir)
    uninterrupted = losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000008")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(run_dir) if r["step"] <= 4))
    torchrun("--resume", "ddp", "--storage-root", str(tmp_path), nproc=1)
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4), step
