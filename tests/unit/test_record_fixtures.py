"""run.json and sweep.json files written by the Kiln before typed records still load, typed, and write back the same.

The fixtures (tests/fixtures/records, see its README) were written by that Kiln's own code; never regenerate them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.run.record import Attempt, Cause, Outcome, RankPlace, RunRecord
from orchestrator.run.registry import RunRegistry
from orchestrator.sweep import record as sweeps
from orchestrator.sweep.record import SweepRecord, TrialEntry
from trainers.run.state import RunState

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
RUN_FIXTURES = sorted(p.name for p in FIXTURES.glob("run_*.json"))


def stored_run(tmp_path: Path, name: str) -> tuple[RunRegistry, RunRecord]:
    """The fixture placed in a storage root as its run's run.json, and the registry's record of it."""
    text = (FIXTURES / name).read_text()
    run_id = json.loads(text)["run_id"]
    (tmp_path / run_id).mkdir()
    (tmp_path / run_id / "run.json").write_text(text)
    registry = RunRegistry(str(tmp_path))
    return registry, registry.load(run_id)


def test_every_run_fixture_is_there():
    assert len(RUN_FIXTURES) == 5, RUN_FIXTURES


@pytest.mark.parametrize("name", RUN_FIXTURES)
def test_a_run_json_of_today_writes_back_key_for_key_and_loads_equal(tmp_path, name):
    registry, record = stored_run(tmp_path, name)
    assert json.loads(record.to_json()) == json.loads((FIXTURES / name).read_text())
    registry.save(record)
    again = registry.load(record.run_id)
    assert again == record and isinstance(again.attempts[0] if again.attempts else Attempt(1, "t"), Attempt)
    saved = json.loads((tmp_path / record.run_id / "run.json").read_text())
    assert {k: v for k, v in saved.items() if k != "updated"} == {
        k: v for k, v in json.loads((FIXTURES / name).read_text()).items() if k != "updated"
    }


def test_a_failed_then_succeeded_run_reads_typed(tmp_path):
    _, record = stored_run(tmp_path, "run_succeeded_after_failure.json")
    assert record.state is RunState.SUCCEEDED and record.step == 20 and record.format_version == 1
    first, second = record.attempts
    assert first.outcome is Outcome.FAILED and second.outcome is Outcome.SUCCEEDED
    assert isinstance(first.cause, Cause) and first.cause.rank == 1 and first.cause.exit_type == "SYSTEM_ERROR"
    assert first.cause.pid == 101 and first.cause.summary.startswith("rank 1's worker process died")
    assert [c.rank for c in first.also] == [0] and first.driver and first.driver["user"] == "ada"
    assert first.ranks == [
        RankPlace(0, "10.0.0.1", 100, "a1" * 28, "10.0.0.1"),
        RankPlace(1, "10.0.0.2", 101, "b2" * 28, "10.0.0.2"),
    ]
    assert first.restored_step is None and first.skipped_checkpoints == [] and first.resharded_from is None
    assert second.restored_step == 10 and second.final_step == 20 and second.cause is None and second.driver is None


def test_hung_lost_node_and_driver_lost_attempts_read_typed(tmp_path):
    _, record = stored_run(tmp_path, "run_driver_lost_hung.json")
    hung, lost, driver_lost, last = record.attempts
    assert [a.outcome for a in record.attempts] == [Outcome.HUNG, Outcome.FAILED, Outcome.DRIVER_LOST, Outcome.FAILED]
    assert hung.cause and (hung.cause.last_step, hung.cause.phase, hung.cause.rank) == (7, "backward", 1)
    assert lost.cause and lost.cause.lost_node == "b2" * 28 and lost.cause.exit_type == "NODE_DIED"
    assert driver_lost.cause and "driver stopped recording" in str(driver_lost.cause.summary)
    assert last.resharded_from == 2 and last.world_size == 1 and last.restored_step == 10
    assert last.skipped_checkpoints and "step_000012" in last.skipped_checkpoints[0]
    assert record.state is RunState.FAILED and record.error and "loss is nan" in record.error
    assert record.checkpoint == {"step": 10, "uri": "/data/runs/driver-lost-hung/checkpoints/step_000010"}


def test_an_elastic_run_reads_its_resizes(tmp_path):
    _, record = stored_run(tmp_path, "run_elastic_resized.json")
    assert [(a.resized_from, a.world_size, a.outcome) for a in record.attempts] == [
        (None, 2, Outcome.RESTARTED),
        (2, 1, Outcome.RESTARTED),
        (1, 2, Outcome.PREEMPTED),
    ]
    assert record.attempts[0].cause == Cause(summary="Ray Train's elastic scaling shrank the group from 2 to 1 workers")
    assert record.state is RunState.PREEMPTED and record.attempts[-1].final_step == 14


def test_a_submitted_run_reads_its_cluster_fields(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()  # one run id in both files
    _, pending = stored_run(tmp_path / "a", "run_submitted_pending.json")
    assert pending.state is RunState.PENDING and pending.attempts == [] and pending.driver is None
    assert (pending.job_id, pending.cluster_address) == ("kiln-submitted-stopped-1", "http://10.0.0.1:8265")
    _, stopped = stored_run(tmp_path / "b", "run_submitted_stopped.json")
    assert (
        stopped.state is RunState.STOPPED
        and stopped.driver
        and stopped.driver["command"] == "kiln start submitted-stopped"
    )
    (attempt,) = stopped.attempts
    assert attempt.outcome is Outcome.STOPPED and attempt.cause and "kiln stop --now" in str(attempt.cause.summary)


def test_a_sweep_json_of_today_loads_typed_and_writes_back_with_its_version(tmp_path):
    text = (FIXTURES / "sweep_stopped.json").read_text()
    assert "format_version" not in json.loads(text)  # sweep.json had none: it is version 1
    (tmp_path / "sweeps" / "lr").mkdir(parents=True)
    (tmp_path / "sweeps" / "lr" / "sweep.json").write_text(text)
    record = sweeps.load(str(tmp_path), "lr")
    assert record.format_version == 1 and record.state == "STOPPED" and record.best == "lr-1"
    assert all(isinstance(t, TrialEntry) for t in record.trials)
    assert [(t.n, t.state) for t in record.trials] == [
        (1, "SUCCEEDED"),
        (2, "PRUNED"),
        (3, "FAILED"),
        (4, "NOT_STARTED"),
    ]
    assert record.trials[3].params == {"optim.lr": 0.4} and record.trials[0].best_val_loss == 5.25
    assert json.loads(record.to_json()) == {**json.loads(text), "format_version": 1}
    sweeps.save(str(tmp_path), record)
    again = sweeps.load(str(tmp_path), "lr")
    assert again == record and isinstance(again, SweepRecord)
