"""The LR schedule's horizon is fixed when a run starts: `kiln resume RUN train.max_steps=N` extends training
without stretching the cosine, for runs saved before optim.schedule_steps existed too."""

from __future__ import annotations

import pytest

from orchestrator.config import UsageError, compose_config, finalize, load_saved_config, to_yaml
from orchestrator.run.lifecycle import prepare_resume
from orchestrator.run.registry import RunRecord, RunRegistry
from trainers.config import OptimConfig
from trainers.optim import lr_multiplier, schedule_horizon


def saved_yaml(*overrides: str, old_kiln: bool = False) -> str:
    """A new run's config.yaml as the driver writes it; old_kiln: as a Kiln without optim.schedule_steps wrote it."""
    text = to_yaml(finalize(compose_config(["train.max_steps=20", "optim.warmup_steps=2", *overrides])))
    if old_kiln:
        assert "  schedule_steps: 20\n" in text
        text = text.replace("  schedule_steps: 20\n", "")
    return text


def test_past_the_horizon_the_multiplier_stays_at_min_lr():
    cfg = OptimConfig(warmup_steps=2, min_lr_ratio=0.1)
    assert lr_multiplier(11, cfg, 20) == pytest.approx(0.55)  # halfway through the cosine (steps 2..20)
    assert [lr_multiplier(step, cfg, 20) for step in (20, 21, 30, 40)] == [pytest.approx(0.1)] * 4
    assert lr_multiplier(21, cfg, 40) == pytest.approx(0.55)  # what a resume stretching it to 40 steps would give


def test_the_horizon_is_schedule_steps_else_max_steps():
    assert schedule_horizon(OptimConfig(schedule_steps=20), max_steps=40) == 20
    assert schedule_horizon(OptimConfig(), max_steps=40) == 40  # a direct trainers.loop.run caller: today's math


def test_a_new_run_records_its_max_steps_as_the_horizon_and_keeps_an_explicit_one():
    assert compose_config(["train.max_steps=20"]).optim.schedule_steps is None
    assert finalize(compose_config(["train.max_steps=20"])).optim.schedule_steps == 20
    assert finalize(compose_config(["train.max_steps=20", "optim.schedule_steps=100"])).optim.schedule_steps == 100
    assert "schedule_steps: 20" in saved_yaml()


@pytest.mark.parametrize("old_kiln", [False, True])
def test_a_resume_with_more_steps_keeps_the_horizon_the_run_started_with(old_kiln):
    resumed = load_saved_config(saved_yaml(old_kiln=old_kiln), ["train.max_steps=40"], "run r")
    assert (resumed.train.max_steps, resumed.optim.schedule_steps) == (40, 20)


def test_an_explicit_horizon_survives_a_resume():
    resumed = load_saved_config(saved_yaml("optim.schedule_steps=100"), ["train.max_steps=40"], "run r")
    assert resumed.optim.schedule_steps == 100


def test_a_run_saved_by_an_older_kiln_resumes_through_the_driver_with_its_own_length(tmp_path):
    root = str(tmp_path)
    RunRegistry(root).create(RunRecord(run_id="old", state="PREEMPTED", max_steps=20), saved_yaml(old_kiln=True))
    _, record, cfg = prepare_resume(root, "old", ["train.max_steps=40"])
    assert (record.max_steps, cfg.train.max_steps, cfg.optim.schedule_steps) == (40, 40, 20)


def test_the_horizon_cannot_be_changed_on_resume():
    with pytest.raises(UsageError) as refused:
        load_saved_config(saved_yaml(), ["optim.schedule_steps=40"], "run r")
    message = str(refused.value)
    assert message.startswith("cannot override 'optim.schedule_steps' when resuming run r; only ")
    assert "train.max_steps" in message


@pytest.mark.parametrize("value", [0, -5])
def test_a_horizon_must_be_positive(value):
    with pytest.raises(
        UsageError, match=rf"optim.schedule_steps must be > 0 \(or null: train.max_steps\), got {value}"
    ):
        compose_config([f"optim.schedule_steps={value}"])
