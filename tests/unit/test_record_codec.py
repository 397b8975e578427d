"""The record codec: the dataclass is the schema; a wrong value is named by its path; a newer Kiln's file is
read where it can be (its unknown keys kept) and refused where it cannot (a newer format_version)."""

from __future__ import annotations

import json

import pytest

from orchestrator.run.attempts import apply_event
from orchestrator.run.record import Attempt, Cause, Outcome, RankPlace, RunRecord
from orchestrator.run.record_codec import NewerFormat, decode, encode, from_json
from orchestrator.run.registry import DamagedRun, RunRegistry
from orchestrator.sweep import record as sweeps
from orchestrator.sweep.record import DamagedSweep, SweepRecord
from trainers.run.state import RunState


def test_outcomes_are_the_strings_run_json_always_held():
    assert [o.value for o in Outcome] == [
        "SUCCEEDED",
        "PREEMPTED",
        "STOPPED",
        "PRUNED",
        "FAILED",
        "HUNG",
        "RESTARTED",
        "DRIVER_LOST",
    ]
    assert json.dumps(Outcome.HUNG) == '"HUNG"' and Outcome.FAILED == "FAILED"


def test_an_attempt_writes_a_key_only_once_it_is_known():
    attempt = Attempt(n=1, started="t0", launcher="ray")
    assert encode(attempt) == {"n": 1, "started": "t0", "launcher": "ray"}
    attempt.world_size = 2  # the group started from scratch: its restore keys are written, null included
    assert encode(attempt) == {
        "n": 1,
        "started": "t0",
        "launcher": "ray",
        "world_size": 2,
        "ranks": None,
        "restored_step": None,
        "skipped_checkpoints": None,
        "resharded_from": None,
    }
    attempt.close(Outcome.FAILED, Cause(), "t1")  # a cause that says nothing is not written
    assert "cause" not in encode(attempt) and encode(attempt)["outcome"] == "FAILED"
    attempt.also.append(Cause(rank=0))
    assert encode(attempt)["also"] == [{"rank": 0}]


def test_events_fold_into_typed_attempts_and_the_record_round_trips():
    record = RunRecord(run_id="r")
    apply_event(record, {"kind": "launched", "launcher": "ray", "driver": {"host": "h"}, "utc": "t0"})
    ranks = [{"rank": 0, "node": "h", "pid": 7, "node_id": "aa"}]
    apply_event(record, {"kind": "started", "world_size": 1, "ranks": ranks, "restored_step": None, "utc": "t1"})
    apply_event(record, {"kind": "hung", "rank": 0, "last_step": 3, "phase": "backward", "waited_s": 9.0, "utc": "t2"})
    (attempt,) = record.attempts
    assert attempt.ranks == [RankPlace(0, "h", 7, "aa")] and attempt.outcome is Outcome.HUNG
    assert attempt.cause == Cause(rank=0, node_id="aa", last_step=3, phase="backward")  # waited_s is no cause field
    assert RunRecord.from_json(record.to_json()) == record


def test_a_malformed_event_is_skipped_not_folded(tmp_path, caplog):
    from orchestrator.run.attempts import merge_events
    from trainers.run.events import record_event

    record = RunRecord(run_id="r")
    record_event(str(tmp_path), "launched", launcher="ray")
    record_event(str(tmp_path), "started", world_size="two", ranks=[])
    assert merge_events(record, str(tmp_path)) is True
    assert record.attempts[0].world_size is None and "world_size" in caplog.text
    assert RunRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "attempt, problem",
    [
        ({"n": 1, "started": "t", "outcome": "WEIRD"}, "attempts[0].outcome 'WEIRD' is not one of SUCCEEDED"),
        ({"n": 1, "started": "t", "cause": {"rank": "one"}}, "field 'attempts[0].cause.rank' is str, expected int"),
        ({"n": 1, "started": "t", "ranks": [{"pid": 3}]}, "attempts[0].ranks[0] has no rank"),
        ({"started": "t"}, "attempts[0] has no n"),
        ({"n": True, "started": "t"}, "field 'attempts[0].n' is bool, expected int"),
    ],
)
def test_a_wrong_value_deep_in_run_json_is_named_by_its_path(tmp_path, attempt, problem):
    registry = RunRegistry(str(tmp_path))
    registry.create(RunRecord(run_id="r1"), "x: 1\n")
    (tmp_path / "r1" / "run.json").write_text(json.dumps({"run_id": "r1", "attempts": [attempt]}))
    with pytest.raises(DamagedRun) as err:
        registry.load("r1")
    assert problem in str(err.value) and "r1/run.json is damaged" in str(err.value)
    records, damaged = registry.list()
    assert records == [] and [d.run_id for d in damaged] == ["r1"]


def test_keys_a_newer_kiln_added_are_read_past_and_written_back(tmp_path):
    registry = RunRegistry(str(tmp_path))
    record = registry.create(RunRecord(run_id="r1"), "x: 1\n")
    apply_event(record, {"kind": "launched", "launcher": "ray", "utc": "t0"})
    registry.save(record)
    data = json.loads((tmp_path / "r1" / "run.json").read_text())
    data["plan"] = {"hops": 1}
    data["attempts"][0]["cost_usd"] = 1.5
    (tmp_path / "r1" / "run.json").write_text(json.dumps(data))
    loaded = registry.load("r1")
    loaded.step = 4
    registry.save(loaded)
    saved = json.loads((tmp_path / "r1" / "run.json").read_text())
    assert saved["plan"] == {"hops": 1} and saved["attempts"][0]["cost_usd"] == 1.5 and saved["step"] == 4


def test_a_newer_format_version_is_refused_naming_the_file(tmp_path):
    registry = RunRegistry(str(tmp_path))
    registry.create(RunRecord(run_id="r1"), "x: 1\n")
    (tmp_path / "r1" / "run.json").write_text(json.dumps({"run_id": "r1", "format_version": 2}))
    with pytest.raises(DamagedRun, match=r"r1/run.json was written by a newer Kiln \(format_version 2; this Kiln"):
        registry.load("r1")
    with pytest.raises(NewerFormat):
        from_json(RunRecord, '{"run_id": "r1", "format_version": 9}')
    assert from_json(RunRecord, '{"run_id": "r1"}').format_version == 1  # no version: today's files, version 1


def test_the_run_state_is_a_run_state_once_read():
    record = decode(RunRecord, {"run_id": "r", "state": "RUNNING"})
    assert record.state is RunState.RUNNING and record._written_state is RunState.RUNNING


def test_a_damaged_sweep_json_is_named_in_one_line(tmp_path):
    folder = tmp_path / "sweeps" / "s"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text('{"sweep_id": "s", "trials": []')
    with pytest.raises(DamagedSweep, match=r"sweep s: .*sweeps/s/sweep.json is damaged \(not valid JSON"):
        sweeps.load(str(tmp_path), "s")
    (folder / "sweep.json").write_text(json.dumps({"sweep_id": "s", "command": "kiln sweep"}))
    with pytest.raises(DamagedSweep, match="has no overrides"):
        sweeps.load(str(tmp_path), "s")
    assert issubclass(DamagedSweep, ValueError) and SweepRecord.from_json
