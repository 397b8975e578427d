"""Failpoints are inert unless armed, fire once where their conditions match, and do what they were armed to do."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tests.failpoints import Failpoints
from trainers import failpoints
from trainers.failpoints import FailpointError, failpoint, parse


@pytest.fixture
def armed(monkeypatch, tmp_path):
    """Arm entries in this process (the parsed table is reset before and after)."""

    def arm(*entries: str) -> Failpoints:
        points = Failpoints(tmp_path / "fp", *entries)
        for key, value in points.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(failpoints, "_armed", None)
        return points

    yield arm
    monkeypatch.setattr(failpoints, "_armed", None)


def test_an_unarmed_point_does_nothing_and_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv(failpoints.ARMED_VAR, raising=False)
    monkeypatch.setattr(failpoints, "_armed", None)
    monkeypatch.chdir(tmp_path)
    failpoint("loop.after_step", step=3, rank=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("loop.after_step=explode", "ACTION one of"),
        ("loop.aftr_step=pause", "NAME one of"),  # a typo would never fire: refused
        ("loop.after_step(step)=pause", "KEY=VALUE"),
        ("loop.after_step(step=3=pause", "cannot use"),
    ],
)
def test_a_malformed_entry_is_refused_naming_it(spec, problem):
    with pytest.raises(ValueError, match=r"KILN_FAILPOINTS") as error:
        parse(spec)
    assert problem in str(error.value)


def test_arming_without_a_folder_is_refused(monkeypatch):
    monkeypatch.setenv(failpoints.ARMED_VAR, "loop.after_step=raise")
    monkeypatch.delenv(failpoints.DIR_VAR, raising=False)
    monkeypatch.setattr(failpoints, "_armed", None)
    with pytest.raises(ValueError, match="KILN_FAILPOINT_DIR"):
        failpoint("loop.after_step", step=1)


def test_a_point_fires_only_where_every_condition_matches_and_only_once(armed):
    points = armed("loop.after_step(step=3,rank=1)=raise")
    failpoint("loop.after_step", step=3, rank=0)  # another rank
    failpoint("loop.after_step", step=2, rank=1)  # another step
    failpoint("checkpoint.committed", step=3, rank=1)  # another point
    with pytest.raises(FailpointError, match="loop.after_step"):
        failpoint("loop.after_step", step=3, rank=1)
    failpoint("loop.after_step", step=3, rank=1)  # a restarted worker passing step 3 again runs on
    assert points.arrivals("loop.after_step") == [{"pid": os.getpid(), "step": 3, "rank": 1}]


def test_two_entries_on_one_point_each_fire_once(armed):
    armed("loop.after_step(step=1)=raise", "loop.after_step(step=2)=raise")
    for step in (1, 2):
        with pytest.raises(FailpointError):
            failpoint("loop.after_step", step=step)
        failpoint("loop.after_step", step=step)


def test_pause_holds_the_caller_at_the_point_until_the_test_releases_it(armed):
    points = armed("checkpoint.committed(step=4)=pause")
    passed = threading.Event()

    def worker() -> None:
        failpoint("checkpoint.committed", step=4, rank=0)
        passed.set()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    assert points.wait("checkpoint.committed")["step"] == 4
    assert not passed.is_set()  # held: the point was reached and has not returned
    points.release("checkpoint.committed")
    thread.join(timeout=30)
    assert passed.is_set()


def test_releasing_one_entry_lets_only_its_process_go_on_and_the_point_says_it_fired(armed):
    points = armed("loop.after_step(run=a,step=2)=pause", "loop.after_step(run=b,step=2)=pause")
    passed = {run: threading.Event() for run in "ab"}

    def worker(run: str) -> None:
        if failpoint("loop.after_step", run=run, step=2):  # True: it fired, held the caller, and let it go
            passed[run].set()

    threads = {run: threading.Thread(target=worker, args=(run,), daemon=True) for run in "ab"}
    for thread in threads.values():
        thread.start()
    for run in "ab":
        points.wait("loop.after_step", run=run)
    points.release("loop.after_step", step=2, run="b")  # the entry's conditions, in any order
    threads["b"].join(timeout=30)
    assert passed["b"].is_set() and not passed["a"].is_set()
    points.release("loop.after_step", run="a", step=2)
    threads["a"].join(timeout=30)
    assert passed["a"].is_set()
    assert not failpoint("loop.after_step", run="a", step=2)  # fired once already: returns at once


@pytest.mark.parametrize(
    "action, ended",
    [("kill", ("kill", signal.SIGKILL)), ("exit(7)", ("exit", 7)), ("hang", ("kill", signal.SIGSTOP))],
)
def test_kill_exit_and_hang_end_or_freeze_the_process_that_reaches_them(armed, monkeypatch, action, ended):
    points = armed(f"loop.after_step(step=2)={action}")
    calls: list[tuple] = []

    class Ended(BaseException):
        pass

    def end(*how):
        calls.append(how)
        raise Ended  # the process would be gone here

    monkeypatch.setattr(os, "kill", lambda pid, sig: end("kill", sig) if pid == os.getpid() else None)
    monkeypatch.setattr(os, "_exit", lambda code: end("exit", code))
    failpoint("loop.after_step", step=1)
    with pytest.raises(Ended):
        failpoint("loop.after_step", step=2)
    assert calls == [ended]
    assert [a["step"] for a in points.arrivals("loop.after_step")] == [2]  # announced before it ended


def test_the_environment_passed_to_workers_carries_only_what_is_armed(armed, monkeypatch):
    monkeypatch.delenv(failpoints.ARMED_VAR, raising=False)
    monkeypatch.delenv(failpoints.DIR_VAR, raising=False)
    assert failpoints.environment() == {}
    points = armed("loop.after_step=sleep(0)")
    assert failpoints.environment() == points.env
