"""Whether a run may be resumed, decided from plain facts that `lifecycle.prepare_resume` gathers one at a time.

The decision asks for what it needs next (the driver's liveness, then the newest checkpoint) instead of
the caller gathering everything up front: a run whose driver still runs is refused before its
checkpoints are listed, as it always was.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from trainers.run.state import RESUMABLE, RunState


class ResumeAction(StrEnum):
    """What `prepare_resume` does next."""

    ASK_DRIVER = "ASK_DRIVER"  # judge whether the driver the record names is alive (liveness.driver_alive)
    ASK_CHECKPOINTS = "ASK_CHECKPOINTS"  # find the newest committed step on storage (the truth, not the record)
    REFUSE_DRIVER_ALIVE = "REFUSE_DRIVER_ALIVE"  # it is running: stop it first, or --force
    REFUSE_FINISHED = "REFUSE_FINISHED"  # it ended at train.max_steps: raise it to train further
    RESUME = "RESUME"


@dataclass(frozen=True)
class ResumeFacts:
    """What is known so far about the run to resume; None: not asked yet."""

    state: RunState
    force: bool  # --force: the user says its driver is gone
    max_steps: int  # as the resumed config says (an override may raise it)
    driver_alive: bool | None = None
    checkpoints_asked: bool = False
    newest_step: int | None = None  # the newest committed checkpoint's step, if any


def decide_resume(facts: ResumeFacts) -> ResumeAction:
    """The next step of deciding whether the run can be resumed."""
    if facts.state == RunState.RUNNING and not facts.force:
        if facts.driver_alive is None:
            return ResumeAction.ASK_DRIVER
        if facts.driver_alive:
            return ResumeAction.REFUSE_DRIVER_ALIVE
    if not facts.checkpoints_asked:
        return ResumeAction.ASK_CHECKPOINTS
    finished = facts.newest_step is not None and facts.newest_step >= facts.max_steps
    if facts.state not in RESUMABLE and finished:
        return ResumeAction.REFUSE_FINISHED
    return ResumeAction.RESUME
