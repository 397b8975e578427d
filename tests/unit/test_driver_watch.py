"""The driver's watch loop as a table: what it does next, at each reading of a fake clock (plain floats)."""

from __future__ import annotations

import pytest

from orchestrator.launch.driver_watch import (
    REFRESH_EVERY_S,
    WORKERS_DONE_GRACE_S,
    CauseSource,
    WatchAction,
    WatchState,
    decide_watch,
    failure_cause_source,
)
from trainers.run.state import RunState

WAIT, REFRESH, STOP = WatchAction.WAIT, WatchAction.REFRESH, WatchAction.STOP_WAITING_FOR_RAY


@pytest.mark.parametrize(
    ("refreshed_at", "workers_done_at", "now", "expected"),
    [
        (None, None, 0.0, REFRESH),  # the first look refreshes at once, whatever the clock says
        (None, None, 1e6, REFRESH),
        (100.0, None, 100.5, WAIT),
        (100.0, None, 100.0 + REFRESH_EVERY_S, WAIT),  # not yet: strictly more than the cadence
        (100.0, None, 100.0 + REFRESH_EVERY_S + 0.1, REFRESH),
        (116.0, 100.0, 100.0 + WORKERS_DONE_GRACE_S, WAIT),  # the grace is not over yet...
        (118.0, 100.0, 120.0, WAIT),
        (118.0, 100.0, 120.1, STOP),  # ...now it is: the workers' word is the outcome
        (110.0, 100.0, 120.1, REFRESH),  # a refresh that is due comes first; the loop then asks again
        (120.1, 100.0, 120.1, STOP),  # ...and is told to stop waiting, in the same turn
        (1000.0, None, 1004.0, WAIT),  # the workers have not said: Ray is waited for as long as it runs
    ],
)
def test_the_watch_loop_refreshes_every_few_seconds_and_gives_ray_a_grace_after_the_workers_ended(
    refreshed_at, workers_done_at, now, expected
):
    assert decide_watch(WatchState(refreshed_at, workers_done_at), now) == expected


@pytest.mark.parametrize(
    ("before", "now", "workers_said", "after"),
    [
        (WatchState(), 10.0, None, WatchState(10.0, None)),
        (WatchState(), 10.0, RunState.SUCCEEDED, WatchState(10.0, 10.0)),
        (WatchState(10.0, None), 15.5, RunState.PREEMPTED, WatchState(15.5, 15.5)),
        (WatchState(15.5, 15.5), 21.0, RunState.SUCCEEDED, WatchState(21.0, 15.5)),  # the first word counts
        (WatchState(15.5, 15.5), 21.0, None, WatchState(21.0, 15.5)),
    ],
)
def test_a_refresh_remembers_when_the_workers_first_said_how_the_run_ended(before, now, workers_said, after):
    assert before.refreshed(now, workers_said) == after


def test_a_whole_run_whose_ray_never_returns_is_given_up_on_after_the_grace():
    """Drive the loop as ray_train.watch does, with a fake clock ticking by the poll interval."""
    state, clock, actions = WatchState(), 0.0, []
    workers_said = None
    while clock < 100:
        clock += 0.5
        if clock >= 30:
            workers_said = RunState.SUCCEEDED  # rank 0 recorded `finished` at 30 s; fit() hangs
        if decide_watch(state, clock) == REFRESH:
            state = state.refreshed(clock, workers_said)
            actions.append(("refresh", clock))
        if decide_watch(state, clock) == STOP:
            actions.append(("stop", clock))
            break
    refreshes = [t for kind, t in actions if kind == "refresh"]
    assert refreshes[:3] == [0.5, 6.0, 11.5]  # every REFRESH_EVERY_S (strictly more), on the poll's ticks
    assert state.workers_done_at == 33.5  # the first refresh after the workers said
    assert actions[-1] == ("stop", 54.0)  # the first poll past the grace (33.5 + 20), between two refreshes


@pytest.mark.parametrize(
    ("recorded_cause", "fit_raised", "expected"),
    [
        ("rank 1's worker process died", True, CauseSource.RECORDED),  # a rank's cause beats Ray's wrapper
        ("rank 1's worker process died", False, CauseSource.RECORDED),
        (None, True, CauseSource.RAY_ERROR),  # no rank said why: Ray's root error
        ("", True, CauseSource.RAY_ERROR),
        (None, False, CauseSource.RECORDED),  # the workers said FAILED without a cause, fit() returned
    ],
)
def test_a_failed_runs_cause_is_what_its_attempt_recorded_else_rays_error(recorded_cause, fit_raised, expected):
    assert failure_cause_source(recorded_cause, fit_raised) == expected
