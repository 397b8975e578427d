"""The decisions about a run that a Ray job drives (`kiln submit`), as pure functions of plain facts.

What Ray says of the job (its status), what run.json says of the run (its state, whether the job's driver
ever wrote to it) and a clock reading go in; what to show or do comes out. orchestrator/cluster/jobs.py and
orchestrator/cli/cluster.py ask Ray and act; tests/unit/test_submitted_run.py tests each table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from orchestrator.cluster.jobs import NOT_FOUND, TERMINAL_JOB_STATUSES, UNREACHABLE
from trainers.run.state import RunState

DRIVER_LOST = "DRIVER_LOST"  # shown for a run whose record says it runs while its Ray job has ended
NEVER_STARTED = "NEVER_STARTED"  # shown for a PENDING run whose Ray job ended before it launched the run
# How long `kiln submit` waits for the head's job agent: a head started seconds ago answers "No available
# agent to submit job" (HTTP 500) until its dashboard agent has registered; Ray waits 10 s of that per try.
AGENT_WAIT_S = 60.0
AGENT_RETRY_S = 2.0
NO_AGENT = "No available agent"  # in the Jobs API's refusal while the head's job agent is not up yet
LOG_TAIL_LINES = 10
STOP_NOW_WAIT_S = 60  # Ray SIGTERMs the driver, then SIGKILLs it a few seconds later


class JobVerdict(StrEnum):
    """What a submitted run is, judged from its record and its Ray job."""

    AS_RECORDED = "AS_RECORDED"  # run.json tells the truth (or Ray cannot be asked)
    DRIVER_LOST = DRIVER_LOST  # the run was launched and its record says it goes on, but its job has ended
    NEVER_STARTED = NEVER_STARTED  # the job ended before its driver ever wrote to the run's record


def judge_submitted_run(recorded: str, job_ended: bool, heard_from_driver: bool) -> JobVerdict:
    """Whether a submitted run's record can be believed, now that its Ray job has ended (or not).

    heard_from_driver: the job's driver wrote to run.json (a launch, or the state it failed in). A job that
    ended without that never ran Kiln (`/bin/sh: kiln: not found`): resuming it would fail the same way.
    """
    if not job_ended:
        return JobVerdict.AS_RECORDED
    if not heard_from_driver:
        return JobVerdict.NEVER_STARTED
    if recorded in (RunState.PENDING, RunState.RUNNING):
        return JobVerdict.DRIVER_LOST
    return JobVerdict.AS_RECORDED


def displayed_state(recorded: str, job_status: str | None) -> str:
    """The state `kiln status` and `kiln runs` show: the recorded one, DRIVER_LOST or NEVER_STARTED.

    From the record alone, a run still PENDING has not been heard from: its job's driver sets RUNNING
    (or FAILED, or `kiln stop --now` STOPPED) the moment it writes.
    """
    ended = job_status in TERMINAL_JOB_STATUSES
    verdict = judge_submitted_run(recorded, ended, heard_from_driver=recorded != RunState.PENDING)
    return recorded if verdict == JobVerdict.AS_RECORDED else str(verdict)


def log_tail(log: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last non-empty lines of a job's log (what says why its entrypoint failed)."""
    return [line for line in log.splitlines() if line.strip()][-lines:]


class DriverJobCheck(StrEnum):
    """What `kiln resume RUN --address` learns about the Ray job that drove the run last."""

    NOT_NEEDED = "NOT_NEEDED"  # not a RUNNING submitted run: the usual liveness check applies
    ASK_JOB = "ASK_JOB"  # ask Ray for the job's status
    DRIVER_GONE = "DRIVER_GONE"  # the job has ended: resume without waiting out a heartbeat
    UNREACHABLE = "UNREACHABLE"  # Ray cannot be asked: refuse, unless --force
    STILL_RUNNING = "STILL_RUNNING"  # refuse: `kiln stop` it first


def decide_driver_job(recorded: str, submitted: bool, job_status: str | None) -> DriverJobCheck:
    """Whether a RUNNING submitted run's Ray job has ended (job_status None: not asked yet)."""
    if recorded != RunState.RUNNING or not submitted:
        return DriverJobCheck.NOT_NEEDED
    if job_status is None:
        return DriverJobCheck.ASK_JOB
    if job_status in TERMINAL_JOB_STATUSES:
        return DriverJobCheck.DRIVER_GONE
    if job_status == UNREACHABLE:
        return DriverJobCheck.UNREACHABLE
    return DriverJobCheck.STILL_RUNNING


class SubmitAction(StrEnum):
    """What `kiln submit` does after one try at submitting the job."""

    ACCEPTED = "ACCEPTED"  # the job is on the cluster
    RETRY = "RETRY"  # the head's job agent is not up yet: try again after wait_s
    ASK_JOB = "ASK_JOB"  # refused: ask Ray whether the job exists anyway (a reply lost after it was taken)
    FORGET_RUN = "FORGET_RUN"  # nothing reached the cluster: remove the new run, so its id stays free
    RECORD_REFUSAL = "RECORD_REFUSAL"  # the run's record says the submission was refused (as before)


@dataclass(frozen=True)
class SubmitTry:
    """One try at submitting a run's job, and what is known after it."""

    error: str | None  # what the Jobs API answered; None: it took the job
    elapsed_s: float  # since the first try began
    new_run: bool  # `kiln submit` registered the run for this job (not a `kiln resume --address`)
    job_status: str | None = None  # after a refusal, Ray's status of the job id (None: not asked)


@dataclass(frozen=True)
class SubmitDecision:
    """The next step, and how long to wait before it."""

    action: SubmitAction
    wait_s: float = 0.0


def decide_submission(tried: SubmitTry, agent_wait_s: float = AGENT_WAIT_S) -> SubmitDecision:
    """After a try: accepted, wait for the job agent and retry, or give up (keeping the record honest)."""
    if tried.error is None:
        return SubmitDecision(SubmitAction.ACCEPTED)
    if NO_AGENT in tried.error and tried.elapsed_s + AGENT_RETRY_S <= agent_wait_s:
        return SubmitDecision(SubmitAction.RETRY, AGENT_RETRY_S)
    if tried.job_status is None:
        return SubmitDecision(SubmitAction.ASK_JOB)
    if tried.job_status == NOT_FOUND:
        # A run registered for this job alone would block its id for nothing; a resumed run keeps its record.
        return SubmitDecision(SubmitAction.FORGET_RUN if tried.new_run else SubmitAction.RECORD_REFUSAL)
    if tried.job_status == UNREACHABLE:
        return SubmitDecision(SubmitAction.RECORD_REFUSAL)  # cannot tell whether it reached the cluster
    return SubmitDecision(SubmitAction.ACCEPTED)  # Ray holds the job though its answer was an error


class StopWait(StrEnum):
    """Where `kiln stop --now` is after asking Ray to stop the run's job."""

    ENDED = "ENDED"  # the job has ended: record the run STOPPED unless its driver said how it ended
    WAIT = "WAIT"  # ask again in a second
    GIVE_UP = "GIVE_UP"  # the job outlived Ray's SIGTERM and SIGKILL: say so


def decide_stop_wait(job_status: str, waited_s: float, limit_s: float = STOP_NOW_WAIT_S) -> StopWait:
    """After `ray job stop`: whether the job has ended, is waited for, or took longer than it ever should."""
    if job_status in TERMINAL_JOB_STATUSES:
        return StopWait.ENDED
    return StopWait.GIVE_UP if waited_s > limit_s else StopWait.WAIT
