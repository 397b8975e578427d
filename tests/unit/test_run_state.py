"""A run's state moves only along TRANSITIONS, and run.json keeps holding the same plain strings."""

from __future__ import annotations

import itertools
import json

import pytest

from orchestrator.run.registry import RunRecord, RunRegistry
from trainers.run.state import (
    RESUMABLE,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    RunState,
    is_terminal,
    transition,
)

LEGAL = [(before, after) for before, targets in TRANSITIONS.items() for after in sorted(targets)]
ILLEGAL = [
    (before, after)
    for before, after in itertools.product(RunState, RunState)
    if before != after and after not in TRANSITIONS[before]
]


def test_every_state_has_its_moves_listed_and_the_values_are_the_run_json_strings():
    assert set(TRANSITIONS) == set(RunState)
    assert [s.value for s in RunState] == [
        "PENDING",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "STOPPED",
        "PREEMPTED",
        "PRUNED",
    ]
    assert RunState.RUNNING == "RUNNING" and f"{RunState.PREEMPTED}" == "PREEMPTED"


@pytest.mark.parametrize("before, after", LEGAL, ids=[f"{b}->{a}" for b, a in LEGAL])
def test_every_legal_move_is_accepted(before, after):
    assert transition(before, after) is after
    assert transition(before.value, after.value) is after  # plain strings, as read from run.json


@pytest.mark.parametrize("state", list(RunState))
def test_staying_in_a_state_is_not_a_move(state):
    # the driver rewrites run.json every few seconds; a second failure leaves a FAILED run FAILED
    assert transition(state, state) is state


@pytest.mark.parametrize("before, after", ILLEGAL, ids=[f"{b}->{a}" for b, a in ILLEGAL])
def test_every_other_move_is_refused_naming_both_states(before, after):
    with pytest.raises(IllegalTransition) as raised:
        transition(before, after)
    message = str(raised.value)
    assert message.startswith(f"a {before} run cannot become {after}"), message


def test_the_table_is_what_the_drivers_do():
    # start, resume (a SUCCEEDED run only with a raised train.max_steps), and the four ways a run ends
    assert ("PENDING", "RUNNING") in LEGAL and ("SUCCEEDED", "RUNNING") in LEGAL
    assert {after for before, after in LEGAL if before == RunState.RUNNING} == TERMINAL
    assert {before for before, after in LEGAL if after == RunState.RUNNING} == set(RunState) - {RunState.RUNNING}
    # nothing goes back to PENDING, and an ended run never turns into another ending
    assert ("SUCCEEDED", "FAILED") in ILLEGAL and ("RUNNING", "PENDING") in ILLEGAL
    assert ("PENDING", "SUCCEEDED") in ILLEGAL and ("PENDING", "PREEMPTED") in ILLEGAL
    # a submitted run can fail on the cluster, or be stopped with `kiln stop --now`, before it starts
    assert ("PENDING", "FAILED") in LEGAL and ("PENDING", "STOPPED") in LEGAL


def test_unknown_states_are_named():
    with pytest.raises(ValueError, match=r"unknown run state 'WEIRD'; known: PENDING, RUNNING"):
        transition("WEIRD", RunState.RUNNING)
    with pytest.raises(ValueError, match="unknown run state 'running'"):
        transition(RunState.PENDING, "running")


def test_terminal_and_resumable():
    assert [s for s in RunState if not is_terminal(s)] == [RunState.PENDING, RunState.RUNNING]
    assert is_terminal("PREEMPTED") and not is_terminal("RUNNING")
    assert {RunState.RUNNING} | (TERMINAL - {RunState.SUCCEEDED}) == RESUMABLE


def test_registry_round_trip_keeps_the_strings(tmp_path):
    registry = RunRegistry(str(tmp_path))
    record = registry.create(RunRecord(run_id="r1"), "x: 1\n")
    for state in (RunState.RUNNING, RunState.PREEMPTED, RunState.RUNNING, RunState.SUCCEEDED):
        record.state = state
        registry.save(record)
        raw = json.loads((tmp_path / "r1" / "run.json").read_text())
        assert raw["state"] == state.value and type(raw["state"]) is str
        loaded = registry.load("r1")
        assert loaded.state == state and loaded.state == state.value
    assert loaded.state == "SUCCEEDED"


def test_registry_refuses_an_illegal_move_and_leaves_run_json_alone(tmp_path):
    registry = RunRegistry(str(tmp_path))
    registry.create(RunRecord(run_id="r1", state="SUCCEEDED"), "x: 1\n")
    before = (tmp_path / "r1" / "run.json").read_text()
    record = registry.load("r1")
    record.state = RunState.FAILED
    with pytest.raises(IllegalTransition, match="a SUCCEEDED run cannot become FAILED"):
        registry.save(record)
    assert (tmp_path / "r1" / "run.json").read_text() == before
    record.state = "RUNNING"  # resuming it (with more steps) is a move it may make, a plain string too
    registry.save(record)
    assert registry.load("r1").state == RunState.RUNNING


def test_registry_judges_a_move_from_what_it_last_wrote(tmp_path):
    registry = RunRegistry(str(tmp_path))
    record = registry.create(RunRecord(run_id="r1"), "x: 1\n")
    record.state = RunState.RUNNING
    registry.save(record)
    registry.save(record)  # a refresh that changes nothing else
    record.state = RunState.FAILED
    registry.save(record)
    registry.save(record)  # a second failure, recorded again
    record.state = RunState.PENDING
    with pytest.raises(IllegalTransition, match="a FAILED run cannot become PENDING"):
        registry.save(record)
