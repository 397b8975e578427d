"""The decisions of a run's driver while Ray Train runs its workers, as pure functions of what it has seen.

`ray_train.watch` polls (fit's thread, metrics.jsonl, the workers' events, Ray's node table) and acts;
what to do next is decided here, from plain values and a clock reading, so that every branch is tested
without Ray or a process (tests/unit/test_driver_watch.py). Shaped as Ray Train v2's controller, whose
failure policy returns a `FailureDecision` instead of acting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from trainers.run.state import RunState

# How long fit() may take to return after the workers recorded that they finished (normally 1-3 s).
WORKERS_DONE_GRACE_S = 20
# How often the driver folds the workers' events into run.json (its heartbeat, read by liveness.py) and
# asks Ray which nodes died (a failed rank's cause then names its lost node).
REFRESH_EVERY_S = 5.0
# How long the driver waits on fit's thread between two looks at the metrics (the progress it shows).
POLL_S = 0.5


class WatchAction(StrEnum):
    """What the driver does next while fit() runs."""

    WAIT = "WAIT"  # show new metrics, then look again in POLL_S
    REFRESH = "REFRESH"  # fold the workers' events into run.json, name lost nodes, save it
    STOP_WAITING_FOR_RAY = "STOP_WAITING_FOR_RAY"  # the workers ended the run; Ray will not return


@dataclass(frozen=True)
class WatchState:
    """What the watch loop remembers: when it last refreshed run.json and first saw the workers' final word."""

    refreshed_at: float | None = None  # monotonic seconds; None: not yet
    workers_done_at: float | None = None

    def refreshed(self, now: float, workers_said: RunState | None) -> WatchState:
        """This state after a refresh at `now` that found the workers' final state (or none)."""
        done_at = self.workers_done_at
        if done_at is None and workers_said is not None:
            done_at = now
        return replace(self, refreshed_at=now, workers_done_at=done_at)


def decide_watch(state: WatchState, now: float) -> WatchAction:
    """The next step of the watch loop at monotonic time `now`.

    Ray can lose its control processes (killed with the driver's cgroup, the OOM killer) and would then end
    the driver with the run still RUNNING: once the workers have recorded their outcome and fit() has not
    returned within WORKERS_DONE_GRACE_S, the workers' word is the outcome.
    """
    if state.refreshed_at is None or now - state.refreshed_at > REFRESH_EVERY_S:
        return WatchAction.REFRESH
    if state.workers_done_at is not None and now - state.workers_done_at > WORKERS_DONE_GRACE_S:
        return WatchAction.STOP_WAITING_FOR_RAY
    return WatchAction.WAIT


def end_state(workers_said: RunState | None, fit_failed: bool, step: int, max_steps: int) -> RunState:
    """How a run ends: what its workers recorded, else FAILED if Ray Train raised, else by the step reached."""
    if workers_said is not None:
        return workers_said
    if fit_failed:
        return RunState.FAILED
    return RunState.SUCCEEDED if step >= max_steps else RunState.STOPPED


class CauseSource(StrEnum):
    """Where a failed run's one line of cause comes from."""

    RECORDED = "RECORDED"  # the cause the attempt recorded (a rank's error, a lost node, a hang)
    RAY_ERROR = "RAY_ERROR"  # the root of what Ray Train raised (it failed before any rank said why)


def failure_cause_source(recorded_cause: str | None, fit_raised: bool) -> CauseSource:
    """The attempt's recorded cause wins; Ray's error only explains a failure no rank recorded."""
    if recorded_cause or not fit_raised:
        return CauseSource.RECORDED
    return CauseSource.RAY_ERROR
