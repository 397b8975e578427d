"""The decisions around a submitted run, without a cluster: where it goes, what it runs, what it shows."""

from __future__ import annotations

import shlex

import pytest

from orchestrator.cluster.jobs import (
    entrypoint,
    exit_code_of,
    jobs_address,
    next_job_id,
    runtime_env,
    shared_root_warning,
)
from orchestrator.config import UsageError
from orchestrator.run.attempts import apply_event, mark_lost_nodes
from orchestrator.run.registry import RunRecord
from orchestrator.run.submitted import DRIVER_LOST, NEVER_STARTED, displayed_state


def test_the_address_comes_from_the_flag_then_ray_address_then_the_config():
    assert jobs_address("http://a:8265", "http://b:8265", "http://c:8265") == "http://a:8265"
    assert jobs_address(None, "http://b:8265", "http://c:8265") == "http://b:8265"
    assert jobs_address(None, None, "http://c:8265") == "http://c:8265"
    with pytest.raises(UsageError, match=r"--address http://HEAD:8265.*RAY_ADDRESS.*cluster.address"):
        jobs_address(None, "", None)


def test_a_cluster_root_is_s3_or_an_absolute_shared_path():
    assert shared_root_warning("s3://bucket/runs") is None
    assert "every node of the cluster must see it" in str(shared_root_warning("/mnt/shared/runs"))
    assert "every node" in str(shared_root_warning("file:///mnt/shared/runs"))
    with pytest.raises(UsageError, match=r"storage.root=./kiln-runs is a relative local path.*s3://"):
        shared_root_warning("./kiln-runs")


def test_each_resubmission_gets_a_new_job_id_and_the_first_is_named_after_the_run():
    assert next_job_id("r1", None) == "kiln-r1"
    assert next_job_id("r1", "kiln-r1") == "kiln-r1-2"
    assert next_job_id("r1", "kiln-r1-2") == "kiln-r1-3"
    assert next_job_id("r1", "raysubmit_x") == "kiln-r1"  # a job id Kiln did not name


def test_the_entrypoint_quotes_every_argument_and_ships_no_secret():
    command = entrypoint(["start", "r 1", "cluster.address=auto", "--storage-root", "s3://b/runs"], False)
    assert shlex.split(command) == ["kiln", "start", "r 1", "cluster.address=auto", "--storage-root", "s3://b/runs"]
    assert entrypoint(["start", "r1"], True).startswith("python -m orchestrator.cli start")
    assert runtime_env(None) is None
    shipped = runtime_env("/src/kiln")
    assert shipped is not None and set(shipped) == {"working_dir", "excludes"} and ".venv" in shipped["excludes"]


@pytest.mark.parametrize(
    ("recorded", "job", "shown"),
    [
        ("RUNNING", "RUNNING", "RUNNING"),
        ("RUNNING", "FAILED", DRIVER_LOST),
        ("RUNNING", "STOPPED", DRIVER_LOST),
        ("RUNNING", "NOT_FOUND", DRIVER_LOST),  # the cluster's head was replaced and forgot the job
        ("PENDING", "FAILED", NEVER_STARTED),  # its job ended before Kiln ran: `kiln: not found` (issue 27)
        ("PREEMPTED", "FAILED", "PREEMPTED"),  # the driver exits 3 when preempted, which Ray calls FAILED
        ("RUNNING", "UNREACHABLE", "RUNNING"),  # cannot tell: show what the record says
        ("RUNNING", None, "RUNNING"),  # not a submitted run
    ],
)
def test_driver_lost_is_a_running_record_whose_job_has_ended(recorded, job, shown):
    assert displayed_state(recorded, job) == shown


def test_follow_exits_as_kiln_train_would():
    assert exit_code_of(0, "SUCCEEDED") == 0 and exit_code_of(3, "PREEMPTED") == 3
    assert exit_code_of(None, "SUCCEEDED") == 0 and exit_code_of(None, "PREEMPTED") == 3
    assert exit_code_of(-9, "FAILED") == 1 and exit_code_of(None, "STOPPED") == 1


def test_a_dead_node_becomes_the_cause_and_the_ranks_errors_its_fallout():
    record = RunRecord(run_id="r")
    ranks = [{"rank": 0, "node_id": "aa", "pid": 1}, {"rank": 1, "node_id": "bb", "pid": 2}]
    apply_event(record, {"kind": "launched", "utc": "t0"})
    apply_event(record, {"kind": "started", "utc": "t1", "world_size": 2, "ranks": ranks})
    # What Ray's controller reports: rank 1's broken collective first, then rank 0 stopped answering.
    apply_event(record, {"kind": "failed", "utc": "t2", "rank": 1, "summary": "RuntimeError: gloo read error"})
    apply_event(record, {"kind": "failed", "utc": "t2", "rank": 0, "summary": "WorkerHealthCheckFailedError"})
    attempt = record.attempts[0]
    assert attempt.cause.node_id == "bb" and attempt.also[0].node_id == "aa"

    assert mark_lost_nodes(record, {"aa"}) is True
    assert attempt.cause.lost_node == "aa" and attempt.cause.rank == 0
    assert "rank 0's node aa was lost" in attempt.cause.summary
    assert [e.rank for e in attempt.also] == [1]
    assert mark_lost_nodes(record, {"aa"}) is False  # once
    assert mark_lost_nodes(RunRecord(run_id="x"), {"aa"}) is False


def test_each_resize_of_an_elastic_run_is_an_attempt_saying_from_how_many_workers_and_why():
    record = RunRecord(run_id="r")
    apply_event(record, {"kind": "launched", "utc": "t0"})
    apply_event(record, {"kind": "started", "utc": "t1", "world_size": 2, "ranks": []})
    apply_event(record, {"kind": "failed", "utc": "t2", "rank": 1, "summary": "node lost"})
    apply_event(record, {"kind": "started", "utc": "t3", "world_size": 1, "ranks": []})  # shrank after the loss
    apply_event(record, {"kind": "started", "utc": "t4", "world_size": 2, "ranks": []})  # grew: no failure
    first, shrunk, grown = record.attempts
    assert first.outcome == "FAILED" and shrunk.resized_from == 2 and grown.resized_from == 1
    assert shrunk.outcome == "RESTARTED"
    assert shrunk.cause.summary == "Ray Train's elastic scaling grew the group from 1 to 2 workers"
    assert first.resized_from is None
