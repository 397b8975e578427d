"""A sweep's record, `<storage.root>/sweeps/<sweep_id>/sweep.json`, and the decisions made over it.

The sweep's driver is its only writer. `kiln sweep stop` leaves a STOP marker beside it (and asks each
running trial to stop), so two processes never write one file. Decisions (what a resume runs, which
trial is best, how a sweep ends) are pure functions over plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from data_pipeline import storage
from data_pipeline.redaction import redact_text
from orchestrator.run.record_codec import NewerFormat, from_json, to_json
from orchestrator.run.registry import DamagedRun, RunRegistry, UnknownRun, now
from trainers.run.state import RunState

if TYPE_CHECKING:
    from orchestrator.sweep.space import ParamValue

SWEEPS_DIR = "sweeps"
SWEEP_FILE = "sweep.json"
STOP_FILE = "STOP"
NOT_STARTED = "NOT_STARTED"  # a point whose run does not exist yet
# sweep.json's format (orchestrator/run/record_codec.py says when it changes); files from before it was written are 1.
FORMAT_VERSION = 1


class UnknownSweep(LookupError):
    """No sweep of that id under the storage root."""


class DamagedSweep(ValueError):
    """A sweep whose sweep.json cannot be read; the message names the file and what is wrong."""


class SweepState:
    """Where a sweep is in its life (sweep.json's `state`)."""

    PENDING = "PENDING"  # submitted as a Ray job, its driver not started yet
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"  # every trial ended (each trial's own state says how)
    STOPPED = "STOPPED"  # `kiln sweep stop` or a signal: `kiln sweep resume` continues it
    FAILED = "FAILED"  # the sweep's driver itself failed


# A trial in one of these states is not run again by `kiln sweep resume` (FAILED only with --retry-failed).
FINISHED_TRIAL_STATES = frozenset({RunState.SUCCEEDED, RunState.PRUNED})


@dataclass
class TrialEntry:
    """One trial as the sweep knows it; the run's own run.json and metrics.jsonl are the truth."""

    n: int
    run_id: str
    overrides: list[str]
    state: str = NOT_STARTED
    step: int = 0
    best_val_loss: float | None = None
    last_metric: float | None = None  # sweep.metric at the trial's last evaluation
    params: dict[str, Any] = field(default_factory=dict)  # an Optuna trial's suggestion
    error: str | None = None


@dataclass
class SweepRecord:
    """sweep.json."""

    sweep_id: str
    command: str
    overrides: list[str]  # the command line's overrides, as typed (a resume plans the sweep again from them)
    storage_root: str
    search: str
    settings: dict[str, Any]
    fixed: list[str]  # overrides every trial gets
    swept: list[str]  # the sweep overrides as typed
    points: list[list[str]]  # every point of a grid or random search; Optuna's as it suggests them
    trials: list[TrialEntry] = field(default_factory=list)
    state: str = SweepState.RUNNING
    best: str | None = None
    max_concurrent: int | None = None  # what the driver ran with
    driver: dict[str, Any] | None = None
    job_id: str | None = None
    cluster_address: str | None = None
    error: str | None = None
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, text: str) -> SweepRecord:
        """Parse sweep.json (keys a newer Kiln added are kept for the next write); ValueError says what is wrong."""
        return from_json(cls, text)

    def to_json(self) -> str:
        """sweep.json's text."""
        return to_json(self)

    def trial(self, n: int) -> TrialEntry | None:
        """The entry of trial n, if the sweep has one."""
        return next((t for t in self.trials if t.n == n), None)


def trial_run_id(sweep_id: str, n: int) -> str:
    """A trial's run id."""
    return f"{sweep_id}-{n}"


def sweep_url(root: str, sweep_id: str) -> str:
    """The sweep's folder."""
    return storage.join(root, SWEEPS_DIR, sweep_id)


def save(root: str, record: SweepRecord) -> None:
    """Write sweep.json whole (atomically), through the redaction."""
    record.updated = now()
    storage.write_atomic(
        storage.join(sweep_url(root, record.sweep_id), SWEEP_FILE),
        redact_text(record.to_json()),
    )


def create(root: str, record: SweepRecord) -> None:
    """Register a new sweep; UsageError if the id is taken."""
    from orchestrator.config import UsageError

    url = storage.join(sweep_url(root, record.sweep_id), SWEEP_FILE)
    record.updated = now()
    try:
        storage.write_new(url, redact_text(record.to_json()))
    except FileExistsError:
        raise UsageError(
            f"sweep {record.sweep_id!r} already exists under {root}; choose another sweep.id, or continue it "
            f"with `kiln sweep resume {record.sweep_id}`"
        ) from None


def load(root: str, sweep_id: str) -> SweepRecord:
    """The sweep's record; UnknownSweep naming the root and the sweeps there; DamagedSweep if unreadable."""
    url = storage.join(sweep_url(root, sweep_id), SWEEP_FILE)
    try:
        return SweepRecord.from_json(storage.read_bytes(url).decode("utf-8", errors="replace"))
    except FileNotFoundError:
        known = sweep_ids(root)
        hint = f"; sweeps there: {', '.join(known[:8])}" if known else "; no sweeps there yet"
        raise UnknownSweep(f"unknown sweep {sweep_id!r} under {root}{hint}") from None
    except NewerFormat as exc:
        raise DamagedSweep(f"sweep {sweep_id}: {url} {exc}") from None
    except ValueError as exc:
        raise DamagedSweep(f"sweep {sweep_id}: {url} is damaged ({exc}); restore it from a backup") from None


def sweep_ids(root: str) -> list[str]:
    """Ids of the sweeps under a storage root."""
    folder = storage.join(root, SWEEPS_DIR)
    return sorted(name for name in storage.list_names(folder) if storage.exists(storage.join(folder, name, SWEEP_FILE)))


def request_sweep_stop(root: str, sweep_id: str, reason: str) -> None:
    """Leave the STOP marker the sweep's driver watches: start no more trials."""
    storage.write_atomic(storage.join(sweep_url(root, sweep_id), STOP_FILE), reason)


def sweep_stop_requested(root: str, sweep_id: str) -> bool:
    """Whether `kiln sweep stop` (or a signal) asked the sweep to stop."""
    return storage.exists(storage.join(sweep_url(root, sweep_id), STOP_FILE))


def clear_sweep_stop(root: str, sweep_id: str) -> None:
    """Forget a served stop request (`kiln sweep resume`)."""
    url = storage.join(sweep_url(root, sweep_id), STOP_FILE)
    if storage.exists(url):
        storage.remove(url)


@dataclass
class ResumePlan:
    """What `kiln sweep resume` does with each trial."""

    resume: list[int]  # trials with a run to continue from its last committed checkpoint
    start: list[int]  # trials whose run never began
    done: list[int]  # trials left as they are


def plan_resume(run_states: dict[int, str | None], retry_failed: bool = False) -> ResumePlan:
    """Sort trials (n -> its run's state, None if no run exists) into resume / start / done."""
    finished = set(FINISHED_TRIAL_STATES) | (set() if retry_failed else {RunState.FAILED})
    plan = ResumePlan([], [], [])
    for n, state in sorted(run_states.items()):
        if state is None or state == NOT_STARTED:
            plan.start.append(n)
        elif state in finished:
            plan.done.append(n)
        else:
            plan.resume.append(n)
    return plan


@dataclass(frozen=True)
class DriverWork:
    """What one run of the sweep's driver does."""

    queue: list[tuple[int, list[str]]]  # (n, point): the trials to continue or start, in order
    new_trials: int  # Optuna: how many more trials to suggest after them
    evaluated: list[tuple[dict[str, ParamValue], float]]  # Optuna: finished trials' (suggestion, sweep.metric)


def driver_work(
    record: SweepRecord, run_states: dict[int, str | None], steps: ResumePlan, num_trials: int | None
) -> DriverWork:
    """The trials a driver runs: the resume plan's to resume and start and, for Optuna, new ones up to num_trials."""
    entries = {t.n: t for t in record.trials}
    queue = [(n, entries[n].overrides) for n in sorted(steps.resume + steps.start)]
    if record.search != "optuna":
        return DriverWork(queue, 0, [])
    evaluated = [
        (t.params, t.last_metric)
        for t in record.trials
        if t.params and t.last_metric is not None and run_states.get(t.n) in FINISHED_TRIAL_STATES
    ]
    return DriverWork(queue, max(0, (num_trials or 0) - len(record.trials)), evaluated)


def aborted_state(exc: BaseException) -> tuple[str, str]:
    """The state and error sweep.json records when the sweep's driver ends by an exception."""
    if isinstance(exc, KeyboardInterrupt):
        return SweepState.STOPPED, "aborted by the user (Ctrl-C twice)"
    return SweepState.FAILED, redact_text(f"{type(exc).__name__}: {exc}")


def best_trial(trials: list[TrialEntry], mode: str) -> TrialEntry | None:
    """The trial with the best sweep.metric at its last evaluation (Ray Tune's scope="last"); None if none has one.

    A FAILED trial is no candidate: its last evaluation may be from before it diverged.
    """
    scored = [t for t in trials if t.last_metric is not None and t.state != RunState.FAILED]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda t: float(t.last_metric or 0.0))


def ended_state(trial_states: list[str]) -> str:
    """How a sweep's driver ends it: FINISHED once every trial ended, else STOPPED (`kiln sweep resume` goes on).

    Unfinished trials without a stop request mean trials the driver could not finish (a trial's driver
    died with its actor): stopped, so that a resume finishes them.
    """
    unfinished = [s for s in trial_states if s not in FINISHED_TRIAL_STATES | {RunState.FAILED}]
    return SweepState.STOPPED if unfinished else SweepState.FINISHED


def trial_summary(rows: list[dict], metric: str) -> tuple[float | None, float | None]:
    """(best val/loss, sweep.metric at the last evaluation) from a trial's metrics.jsonl rows."""
    losses = [float(r["val/loss"]) for r in rows if isinstance(r.get("val/loss"), (int, float))]
    values = [float(r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    return (min(losses) if losses else None), (values[-1] if values else None)


def refresh_entry(registry: RunRegistry, entry: TrialEntry, metric: str) -> None:
    """An entry's state, step and metrics from its run (the truth), where the run exists."""
    try:
        run = registry.load(entry.run_id)
    except UnknownRun:
        return
    except DamagedRun as exc:  # one damaged run.json must not hide the rest of the sweep
        entry.error = str(exc)
        return
    entry.state, entry.step = run.state, run.step
    entry.best_val_loss, last = trial_summary(registry.metrics(entry.run_id), metric)
    entry.last_metric = last if last is not None else entry.last_metric
    entry.error = run.error or entry.error
