"""The loop runs under plain torchrun, and a checkpoint restores training exactly in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.slow


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m orchestrator.torchrun ARGS`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "orchestrator.torchrun", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ten_steps_save_fresh_process_ten_more_equals_twenty_uninterrupted(tmp_path, cache_dir):
    run_dir = tmp_path / "exact"
    torchrun(*TINY, "run.id=exact", f"storage.root={tmp_path}", "tracker=none", "model.dropout=0.1",
             "train.max_steps=20", "train.checkpoint_every=10", "train.eval_every=10")
    assert not (run_dir / "wandb").exists()  # tracker=none: no W&B, metrics.jsonl only
    uninterrupted = {r["step"]: r for r in rows(run_dir) if "train/loss" in r}
    assert sorted(uninterrupted) == list(range(1, 21))
    assert uninterrupted[20]["train/loss"] < uninterrupted[1]["train/loss"]

    # Forget everything after step 10, as if the run had died right after committing it.
    shutil.rmtree(run_dir / "checkpoints" / "step_000020")
    kept = [r for r in rows(run_dir) if r["step"] <= 10]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    result = torchrun("--resume", "exact", "--storage-root", str(tmp_path))
    assert "SUCCEEDED run exact at step 20" in result.stdout + result.stderr
    resumed = {r["step"]: r for r in rows(run_dir) if "train/loss" in r and r["step"] > 10}
    assert sorted(resumed) == list(range(11, 21))
    for step in range(11, 21):
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert resumed[step][key] == uninterrupted[step][key], (step, key)
    assert resumed[20]["val/loss"] == uninterrupted[20]["val/loss"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["state"] == "SUCCEEDED" and record["checkpoint"]["step"] == 20
    assert [a["launcher"] for a in record["attempts"]] == ["torchrun", "torchrun"]


def test_resume_rejects_overrides_that_change_the_math(tmp_path, cache_dir):
    torchrun(*TINY, "run.id=r", f"storage.root={tmp_path}", "tracker=none", "train.max_steps=2",
             "train.eval_every=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "orchestrator.torchrun", "--resume", "r", "--storage-root", str(tmp_path), "optim.lr=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    assert "cannot override 'optim.lr' when resuming" in result.stderr


def test_trainers_never_import_ray():
    sources = list((REPO / "trainers").rglob("*.py"))
    assert sources
    for path in sources:
        text = path.read_text()
        assert "import ray" not in text and "from ray" not in text, path
    code = ("import sys, trainers.loop, orchestrator.torchrun; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0
