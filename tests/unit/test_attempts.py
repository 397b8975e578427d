"""run.json's attempts are rebuilt from events: each worker group, how it ended, and why."""

from __future__ import annotations

from orchestrator.run.attempts import apply_event, describe_worker_failure
from orchestrator.run.registry import RunRecord


def fold(*events: dict) -> RunRecord:
    record = RunRecord(run_id="r")
    for event in events:
        apply_event(record, event)
    return record


def test_a_worker_death_closes_the_attempt_and_ray_restart_opens_the_next():
    record = fold(
        {"kind": "launched", "launcher": "ray", "driver": {"host": "h"}, "utc": "t0"},
        {"kind": "started", "world_size": 2, "restored_step": None, "ranks": [], "utc": "t1"},
        {"kind": "failed", "rank": 1, "pid": 42, "summary": "rank 1's worker process died", "utc": "t2"},
        {"kind": "failed", "rank": 0, "summary": "fallout", "utc": "t2"},
        {"kind": "started", "world_size": 2, "restored_step": 10, "skipped": [], "launcher": "ray", "utc": "t3"},
        {"kind": "finished", "state": "SUCCEEDED", "step": 20, "utc": "t4"},
    )
    first, second = record.attempts
    assert first.outcome == "FAILED" and first.cause.pid == 42 and first.also[0].rank == 0
    assert second.restored_step == 10 and second.outcome == "SUCCEEDED" and second.final_step == 20


def test_a_new_driver_marks_the_unfinished_attempt_as_driver_lost_and_notes_skipped_checkpoints():
    record = fold(
        {"kind": "launched", "launcher": "ray", "utc": "t0"},
        {"kind": "started", "world_size": 2, "restored_step": None, "utc": "t1"},
        {"kind": "launched", "launcher": "ray", "utc": "t2"},
        {
            "kind": "started",
            "world_size": 1,
            "restored_step": 10,
            "resharded_from": 2,
            "skipped": ["s3://b/r/checkpoints/step_000012: shards/x does not match its sha256"],
            "utc": "t3",
        },
    )
    assert record.attempts[0].outcome == "DRIVER_LOST"
    assert record.attempts[1].resharded_from == 2 and record.attempts[1].ended is None
    assert "loaded step 10" in record.notes[0] and "step_000012" in record.notes[0]


def test_ray_worker_death_message_is_read_for_rank_node_and_pid():
    message = (
        "A worker health check failed.\nWorker info: Worker(\n  metadata=ActorMetadata(\n    hostname='vm',"
        "\n    node_id='4afb',\n    node_ip='192.0.2.2',\n    pid=15483,\n  ),\n)\nThe actor is dead because "
        "its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly "
        "exits with a connection error code 2. End of file."
    )
    cause = describe_worker_failure(1, RuntimeError(message))
    assert cause["pid"] == 15483 and cause["node"] == "192.0.2.2 (vm)" and cause["exit_type"] == "SYSTEM_ERROR"
    assert cause["summary"].startswith("rank 1's worker process died")
    raised = describe_worker_failure(0, ValueError("line one\nloss is nan at step 3"))
    assert raised["summary"] == "ValueError: loss is nan at step 3 (rank 0)"


def test_a_dead_process_is_the_cause_even_when_its_peer_reported_first():
    record = fold(
        {"kind": "launched", "launcher": "ray", "utc": "t0"},
        {"kind": "started", "world_size": 2, "restored_step": None, "utc": "t1"},
        {"kind": "failed", "rank": 0, "summary": "RuntimeError: Connection closed by peer (rank 0)", "utc": "t2"},
        {
            "kind": "failed",
            "rank": 1,
            "exit_type": "SYSTEM_ERROR",
            "summary": "rank 1's worker process died",
            "utc": "t2",
        },
    )
    attempt = record.attempts[0]
    assert attempt.cause.rank == 1 and attempt.also[0].rank == 0
