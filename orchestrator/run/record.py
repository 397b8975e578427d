"""What run.json holds, as typed dataclasses: the run, its attempts, and why each attempt ended.

These classes are the file's schema: orchestrator/run/record_codec.py writes and reads run.json from them
(the rules for absent keys, unknown keys and format_version are there). The JSON is what Kiln wrote
before the records were typed, key for key; tests/fixtures/records holds such files and a test reads them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from enum import StrEnum

from orchestrator.run.record_codec import OMIT_IF_EMPTY, OMIT_IF_NONE, from_json, to_json, written_with
from trainers.run.state import RunState

# Bumped only for a change an older Kiln would misread (see record_codec); 1 is every run.json so far.
FORMAT_VERSION = 1


def now() -> str:
    """UTC timestamp, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Outcome(StrEnum):
    """How an attempt (one worker group) ended; the value is what run.json holds."""

    SUCCEEDED = "SUCCEEDED"  # the workers reached train.max_steps
    PREEMPTED = "PREEMPTED"  # the workers stopped early with a committed checkpoint (SIGTERM, `kiln stop`)
    STOPPED = "STOPPED"  # ended early without one (`kiln stop --now`, Ctrl-C twice)
    PRUNED = "PRUNED"  # a sweep's early stopping ended the trial
    FAILED = "FAILED"  # a worker failed, or the driver gave up on the group
    HUNG = "HUNG"  # a rank's step watchdog fired
    RESTARTED = "RESTARTED"  # Ray Train replaced a group that had not failed (elastic resize)
    DRIVER_LOST = "DRIVER_LOST"  # the driver died before the attempt ended; the next driver says so


# The outcomes a run's state can be taken from (the workers' own word on how the run ended).
RUN_ENDING = {Outcome.SUCCEEDED: RunState.SUCCEEDED, Outcome.PREEMPTED: RunState.PREEMPTED}


@dataclass
class Cause:
    """Why an attempt ended: a one-line summary and where it happened, each key only where known."""

    summary: str | None = field(default=None, metadata=OMIT_IF_NONE)
    rank: int | None = field(default=None, metadata=OMIT_IF_NONE)
    node: str | None = field(default=None, metadata=OMIT_IF_NONE)  # "ip (hostname)" or a hostname
    node_id: str | None = field(default=None, metadata=OMIT_IF_NONE)  # Ray's node id
    lost_node: str | None = field(default=None, metadata=OMIT_IF_NONE)  # the Ray node id that died under it
    pid: int | None = field(default=None, metadata=OMIT_IF_NONE)
    exit_type: str | None = field(default=None, metadata=OMIT_IF_NONE)  # Ray's, or NODE_DIED / DIED
    exit_code: int | None = field(default=None, metadata=OMIT_IF_NONE)
    last_step: int | None = field(default=None, metadata=OMIT_IF_NONE)  # a hang's
    phase: str | None = field(default=None, metadata=OMIT_IF_NONE)  # a hang's: what the rank was doing

    def empty(self) -> bool:
        """Whether the cause says nothing."""
        return self == Cause()

    def update(self, other: Cause) -> None:
        """Take every field other knows."""
        for f in fields(other):
            if getattr(other, f.name) is not None:
                setattr(self, f.name, getattr(other, f.name))


# The keys of a failed/hung event that explain it (a Cause's fields).
CAUSE_FIELDS = tuple(f.name for f in fields(Cause))


@dataclass
class RankPlace:
    """Where one rank of a group ran."""

    rank: int
    node: str | None = field(default=None, metadata=OMIT_IF_NONE)
    pid: int | None = field(default=None, metadata=OMIT_IF_NONE)
    node_id: str | None = field(default=None, metadata=OMIT_IF_NONE)  # a Ray worker's; torchrun has none
    node_address: str | None = field(default=None, metadata=OMIT_IF_NONE)
    mesh: dict[str, int] | None = field(default=None, metadata=OMIT_IF_NONE)  # {"replicate", "shard", "tensor"}


@dataclass
class Attempt:
    """One worker group of a run: when it ran, where, from which step, and how it ended.

    A key appears in run.json once it is known: the group's shape once its workers started (world_size
    and the keys written with it, null included), ended/outcome once it ended.
    """

    n: int
    started: str
    launcher: str | None = None  # "ray" or "torchrun"
    driver: dict | None = field(default=None, metadata=OMIT_IF_NONE)  # who launched it (a new driver only)
    resized_from: int | None = field(default=None, metadata=OMIT_IF_NONE)  # an elastic group's size before
    world_size: int | None = field(default=None, metadata=OMIT_IF_NONE)
    # The DeviceMesh beyond one data axis (parallel.*): {"replicate", "shard", "tensor"}; absent for plain runs.
    mesh: dict[str, int] | None = field(default=None, metadata=OMIT_IF_NONE)
    ranks: list[RankPlace] | None = field(default=None, metadata=written_with("world_size"))
    restored_step: int | None = field(default=None, metadata=written_with("world_size"))  # None: from scratch
    skipped_checkpoints: list[str] | None = field(default=None, metadata=written_with("world_size"))
    resharded_from: int | None = field(default=None, metadata=written_with("world_size"))
    final_step: int | None = field(default=None, metadata=OMIT_IF_NONE)  # the workers' last step, if they said
    ended: str | None = field(default=None, metadata=OMIT_IF_NONE)
    outcome: Outcome | None = field(default=None, metadata=OMIT_IF_NONE)
    cause: Cause | None = field(default=None, metadata=OMIT_IF_NONE)
    also: list[Cause] = field(default_factory=list, metadata=OMIT_IF_EMPTY)  # other ranks' errors, fallout

    def close(self, outcome: Outcome, cause: Cause | None, when: str) -> None:
        """Mark the attempt ended (the cause kept only if it says something)."""
        self.ended, self.outcome = when, Outcome(outcome)
        if cause is not None and not cause.empty():
            self.cause = cause


@dataclass
class RunRecord:
    """What run.json holds."""

    run_id: str
    state: RunState = RunState.PENDING  # trainers/run/state.py says which changes are legal
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    experiment: str = "run"
    step: int = 0
    max_steps: int = 0
    checkpoint: dict | None = None  # {"step": int, "uri": str} of the last committed checkpoint
    strategy: str = "ddp"
    num_workers: int = 0
    wandb: dict | None = None  # {"mode", "run_id", "dir"}
    attempts: list[Attempt] = field(default_factory=list)  # one per worker group, with how it ended
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # recoveries worth knowing (skipped checkpoints, stops)
    events_cursor: str = ""  # the last events/ entry folded into attempts
    driver: dict | None = None  # {"host", "pid_ns", "pid", "started", "command"} of the driver now or last
    job_id: str | None = None  # the Ray job (submission id) driving a `kiln submit` run now or last
    cluster_address: str | None = None  # the Ray Jobs API address it was submitted to
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # The state run.json holds (not a field, so never written): save() allows only legal moves from it.
        self._written_state = self.state

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        """Parse run.json (keys a newer Kiln added are kept for the next write); ValueError says what is wrong."""
        return from_json(cls, text)

    def to_json(self) -> str:
        """run.json's text."""
        return to_json(self)
