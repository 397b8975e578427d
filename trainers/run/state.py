"""A run's state and the moves between states: the one place that says which changes are legal.

It lives in trainers/ because both the workers (a loop's result, a tracker's finish) and the
orchestrator (run.json) speak of states, and imports only point down. StrEnum members are strings,
so run.json holds the same text as before and comparisons with plain strings keep working.
"""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    """Where a run is in its life; the value is what run.json holds."""

    PENDING = "PENDING"  # registered, no worker started yet
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"  # reached train.max_steps
    FAILED = "FAILED"
    STOPPED = "STOPPED"  # ended early, possibly without a final checkpoint (Ctrl-C twice)
    PREEMPTED = "PREEMPTED"  # stopped early with a committed checkpoint (SIGTERM, `kiln stop`)
    PRUNED = "PRUNED"  # a sweep's early stopping (ASHA) ended this trial, with a committed checkpoint


# Where each state may move. Staying put is always allowed (the driver rewrites run.json often).
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    # A submitted run is PENDING until its Ray job's driver starts it; it can fail there (data missing on
    # the cluster) or be stopped (`kiln stop --now`) before it ever runs.
    RunState.PENDING: frozenset({RunState.RUNNING, RunState.FAILED, RunState.STOPPED}),
    RunState.RUNNING: frozenset(
        {RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED, RunState.PREEMPTED, RunState.PRUNED}
    ),
    # `kiln resume`: a SUCCEEDED run goes on only with a raised train.max_steps (prepare_resume checks that).
    RunState.SUCCEEDED: frozenset({RunState.RUNNING}),
    RunState.FAILED: frozenset({RunState.RUNNING}),
    RunState.STOPPED: frozenset({RunState.RUNNING}),
    # A pruned trial's workers commit and stop as for any stop request (PREEMPTED); its sweep then says why.
    RunState.PREEMPTED: frozenset({RunState.RUNNING, RunState.PRUNED}),
    RunState.PRUNED: frozenset({RunState.RUNNING}),
}
# States `kiln resume` continues without asking for more steps (RUNNING: its driver is gone, or --force).
RESUMABLE = frozenset({RunState.RUNNING, RunState.FAILED, RunState.STOPPED, RunState.PREEMPTED, RunState.PRUNED})
TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED, RunState.PREEMPTED, RunState.PRUNED})


class IllegalTransition(ValueError):
    """A state change the run's life does not allow; the message names both states."""


def parse(state: str) -> RunState:
    """The RunState named state; ValueError naming it and the known states otherwise."""
    try:
        return RunState(state)
    except ValueError:
        raise ValueError(f"unknown run state {state!r}; known: {', '.join(RunState)}") from None


def transition(current: str, new: str) -> RunState:
    """new, if a run in state current may move there; IllegalTransition otherwise."""
    before, after = parse(current), parse(new)
    if after != before and after not in TRANSITIONS[before]:
        allowed = ", ".join(sorted(TRANSITIONS[before])) or "nothing"
        raise IllegalTransition(f"a {before} run cannot become {after} (from {before}: {allowed})")
    return after


def is_terminal(state: str) -> bool:
    """Whether a run in this state has ended (nothing is driving it)."""
    return parse(state) in TERMINAL
