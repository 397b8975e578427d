"""The sweep's decisions about its trials, as pure functions: Tune's word and the run's record in, an action out.

Ray Tune reports what it did to a trial; the trial's run (run.json, its events) says what happened to it.
The sweep's driver and the trial actor ask Tune and storage, then act on what these functions decide
(tests/unit/test_sweep_reconcile.py tests each table).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from orchestrator.sweep.record import NOT_STARTED
from trainers.run.state import RunState


@dataclass(frozen=True)
class TrialEnd:
    """How a trial's entry in sweep.json ends: its state, its error, and whether the driver says so."""

    state: str
    error: str | None
    announce: bool = True


def reconcile_trial_end(
    entry_state: str, entry_error: str | None, result_state: str | None, result_error: str | None, run_exists: bool
) -> TrialEnd:
    """A trial's final entry, from its refreshed entry (what the run recorded) and Tune's last result.

    result_state is what the trial's actor reported last: NOT_STARTED (the sweep was stopped before its run
    began), FAILED (it could not run, or its driver died) or the run's own end state.
    """
    if result_state == NOT_STARTED and not run_exists:
        # Stopped before this trial's run began: `kiln sweep resume` runs it; nothing to say now.
        return TrialEnd(NOT_STARTED, entry_error, announce=False)
    state = entry_state
    if entry_state in (NOT_STARTED, RunState.RUNNING) and result_state == RunState.FAILED:
        state = RunState.FAILED  # it could not start (or its driver died) without its run saying so
    return TrialEnd(state, result_error or entry_error)


class RelabelAction(StrEnum):
    """What a trial's actor does with the state its run ended in."""

    KEEP = "KEEP"
    ASK_EVENTS = "ASK_EVENTS"  # was the newest stop asked of the run since this trial began the sweep's pruning?
    RELABEL_PRUNED = "RELABEL_PRUNED"  # record the run PRUNED: ASHA stopped it, not a user or a preemption


def decide_relabel(run_state: str, pruned_since_start: bool | None) -> RelabelAction:
    """Whether a trial's PREEMPTED run was in fact pruned (None: the run's events not read yet)."""
    if run_state != RunState.PREEMPTED:
        return RelabelAction.KEEP
    if pruned_since_start is None:
        return RelabelAction.ASK_EVENTS
    return RelabelAction.RELABEL_PRUNED if pruned_since_start else RelabelAction.KEEP


class AshaStep(StrEnum):
    """What the sweep's ASHA does with Tune's decision for one result."""

    PASS_ON = "PASS_ON"  # Tune's own decision stands (CONTINUE, PAUSE, or STOP of a trial that is done)
    PRUNE = "PRUNE"  # ask the run to commit and stop, and tell Tune to CONTINUE: the trial ends itself
    CONTINUE = "CONTINUE"  # already asked: keep the trial going until its run has stopped


def decide_asha(tune_said_stop: bool, trial_done: bool, asked_before: bool) -> AshaStep:
    """Turn ASHA's STOP into a stop request: Tune would end the actor before the run commits its checkpoint."""
    if not tune_said_stop or trial_done:
        return AshaStep.PASS_ON
    return AshaStep.CONTINUE if asked_before else AshaStep.PRUNE
