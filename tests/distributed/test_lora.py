"""LoRA on every strategy peft's adapters can be sharded by: 2 workers train only the adapters, checkpoints
hold only them (the frozen base comes from the run's init_from copy), and a resume repeats the uninterrupted
losses bit for bit. The strategies proven here are trainers/config/training.py's LORA_STRATEGIES."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import STRATEGY_RUN, rows, torchrun
from trainers.config import LORA_STRATEGIES

pytestmark = pytest.mark.slow

# The strategy runs' data and batch, on the 20-step DDP run as the base (its tiny Llama: peft adapts q_proj and v_proj).
LORA_RUN = [o for o in STRATEGY_RUN if not o.startswith(("model", "train."))]
LORA_RUN += ["train.global_batch=8", "train.micro_batch=4", "train.eval_batches=2", "train.max_steps=4"]
LORA_RUN += ["train.checkpoint_every=2", "train.eval_every=2", "model.init_from=run:ddp"]
LORA_RUN += ["model.lora.r=4", "model.lora.dropout=0.1", "optim.lr=1e-2"]  # dropout on: RNG restore matters


def shard_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in (checkpoint / "shards").rglob("*") if p.is_file())


@pytest.mark.parametrize("strategy", LORA_STRATEGIES)
def test_lora_trains_saves_only_adapters_and_resumes_bit_identical(trained_runs, strategy, tmp_path):
    root = trained_runs("ddp").parent  # run:ddp lives there
    run_id = f"lora-{strategy}"
    shutil.rmtree(root / run_id, ignore_errors=True)
    torchrun(*LORA_RUN, f"strategy={strategy}", f"run.id={run_id}", f"storage.root={root}")
    run_dir = root / run_id
    uninterrupted = {r["step"]: r for r in rows(run_dir) if "train/loss" in r}
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    # The adapters learn: the training loss falls. (The 20-step base is barely trained, so 4 steps of
    # adapters on it do not reliably move the val loss; the fine-tuning story shows what LoRA learns.)
    losses = [uninterrupted[step]["train/loss"] for step in (1, 2, 3, 4)]
    assert min(losses[1:]) < losses[0], losses
    # Only the adapters and their optimizer state are saved: a small share of the full model's checkpoint.
    full = shard_bytes(root / "ddp" / "checkpoints" / "step_000020")
    assert shard_bytes(run_dir / "checkpoints" / "step_000004") < full / 4
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(run_dir) if r["step"] <= 2))
    torchrun("--resume", run_id, "--storage-root", str(root))
    resumed = {r["step"]: r for r in rows(run_dir) if "train/loss" in r and r["step"] > 2}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["train/loss"] == uninterrupted[step]["train/loss"], step
        assert resumed[step]["train/grad_norm"] == uninterrupted[step]["train/grad_norm"], step
