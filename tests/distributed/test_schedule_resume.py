"""A finished 20-step run resumed with train.max_steps=40 keeps the LR schedule it started with (issue 26, E).

The session's 20-step DDP run (tests/conftest.py `trained_runs`) is copied and resumed under torchrun: the
cosine reached min_lr at step 20, so steps 21..40 train on at min_lr instead of jumping back up a cosine
stretched to 40 steps (before the horizon was recorded: lr 1.0e-4 at step 20, 5.5e-4 at step 21).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.config import load_saved_config
from tests.helpers import rows, torchrun
from trainers.optim import lr_multiplier

pytestmark = pytest.mark.slow


def training_rows(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (logged lr, loss) of the run's training rows, each step logged once."""
    logged = [(r["step"], (r["train/lr"], r["train/loss"])) for r in rows(run_dir) if "train/lr" in r]
    assert len({step for step, _ in logged}) == len(logged), "a step was logged twice"
    return dict(logged)


def test_a_20_step_run_resumed_to_40_steps_continues_its_lr_schedule_at_min_lr(trained_runs, tmp_path):
    run_dir = tmp_path / "ddp"
    shutil.copytree(trained_runs("ddp"), run_dir)
    original = training_rows(run_dir)
    assert sorted(original) == list(range(1, 21))
    saved = (run_dir / "config.yaml").read_text()
    optim = load_saved_config(saved, [], "config.yaml").optim
    assert optim.schedule_steps == 20  # recorded when the run started

    torchrun("--resume", "ddp", "--storage-root", str(tmp_path), "train.max_steps=40")

    resumed = training_rows(run_dir)
    assert sorted(resumed) == list(range(1, 41))
    assert {step: resumed[step] for step in original} == original  # steps 1..20 as they were
    for step, (lr, _) in resumed.items():
        assert lr == pytest.approx(optim.lr * lr_multiplier(step, optim, 20), rel=1e-12), step
    min_lr = optim.lr * optim.min_lr_ratio
    assert [resumed[step][0] for step in range(20, 41)] == [pytest.approx(min_lr, rel=1e-12)] * 21  # no jump at 21
    assert (run_dir / "config.yaml").read_text() == saved  # a resume never rewrites the run's config
