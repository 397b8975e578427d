"""A run's attempts, rebuilt from its event log: when each worker group ran, and why it ended.

Workers (rank 0), Ray's controller (via AttemptCallback) and the driver write events; only the driver
folds them into run.json, so the record has one writer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from typing import TypeVar

from data_pipeline.redaction import redact_text
from orchestrator.run.record import RUN_ENDING, Attempt, Cause, Outcome, RankPlace, RunRecord, now
from orchestrator.run.record_codec import decode
from trainers.run.events import STOP_REQUESTED, read_events, record_event
from trainers.run.state import RunState

DRIVER_LOST = "the driver stopped recording (the kiln process or its machine died) before the attempt ended"

log = logging.getLogger("kiln.driver")
T = TypeVar("T")


def current(record: RunRecord) -> Attempt | None:
    """The attempt still running, if any."""
    return record.attempts[-1] if record.attempts and record.attempts[-1].ended is None else None


def open_attempt(record: RunRecord, when: str, launcher: str | None, driver: dict | None = None) -> Attempt:
    """Start a new attempt."""
    attempt = Attempt(n=len(record.attempts) + 1, started=when, launcher=launcher, driver=driver)
    record.attempts.append(attempt)
    return attempt


@dataclass
class Launched:
    """What a `launched` event says: a driver is starting a worker group."""

    launcher: str | None = None
    driver: dict | None = None


@dataclass
class GroupStarted:
    """What a `started` event says about a worker group (rank 0 writes it once the group restored)."""

    world_size: int | None = None
    ranks: list[RankPlace] | None = None
    mesh: dict[str, int] | None = None
    launcher: str | None = None
    restored_step: int | None = None
    skipped: list[str] | None = None  # newer checkpoints that failed verification, with why
    resharded_from: int | None = None


@dataclass
class Finished:
    """What a `finished` event says: the workers ended the run (rank 0's word)."""

    state: Outcome | None = None
    step: int | None = None
    reason: str | None = None  # why they stopped early (a stop request), if they did


def event_as(cls: type[T], event: dict) -> T:
    """The fields of an event that cls knows, checked against their types (ValueError if one does not fit)."""
    return decode(cls, {k: v for k, v in event.items() if k in {f.name for f in fields(cls)}})  # type: ignore[arg-type]


def cause_of(event: dict) -> Cause:
    """The fields of a failed/hung event that explain it."""
    return event_as(Cause, {k: v for k, v in event.items() if v is not None})


def apply_event(record: RunRecord, event: dict) -> None:
    """Fold one event into the record's attempts; ValueError if its fields do not fit the record."""
    kind, when = event.get("kind"), event.get("utc", now())
    attempt = current(record)
    if kind == "launched":
        launched = event_as(Launched, event)
        if attempt is not None:
            attempt.close(Outcome.DRIVER_LOST, Cause(summary=DRIVER_LOST), when)
        open_attempt(record, when, launched.launcher, launched.driver)
    elif kind == "started":
        group_started(record, event_as(GroupStarted, event), when)
    elif kind in ("failed", "hung"):
        rank_failed(record, with_node_id(event, attempt or (record.attempts[-1] if record.attempts else None)), when)
    elif kind == "finished" and attempt is not None:
        finished = event_as(Finished, event)
        attempt.final_step = finished.step
        reason = Cause(summary=finished.reason) if finished.reason else None
        attempt.close(finished.state or Outcome.SUCCEEDED, reason, when)
    elif kind == STOP_REQUESTED:
        record.notes.append(f"{when}: stop requested: {event.get('reason')}")


def group_started(record: RunRecord, event: GroupStarted, when: str) -> None:
    """A worker group started: fill the open attempt, or close the one Ray replaced and open the next."""
    attempt = current(record)
    if attempt is None or attempt.world_size is not None:  # Ray restarted the group, or a new launcher
        previous = record.attempts[-1].world_size if record.attempts else None
        if attempt is not None:
            attempt.close(Outcome.RESTARTED, resize_cause(previous, event.world_size), when)
        attempt = open_attempt(record, when, event.launcher)
        if previous and event.world_size and previous != event.world_size:
            attempt.resized_from = previous
    attempt.world_size, attempt.ranks, attempt.mesh = event.world_size, event.ranks, event.mesh
    attempt.restored_step, attempt.skipped_checkpoints = event.restored_step, event.skipped or []
    attempt.resharded_from = event.resharded_from
    if event.skipped:
        record.notes.append(
            f"{when}: attempt {attempt.n} found newer checkpoints that fail verification "
            f"and loaded step {event.restored_step} instead: " + "; ".join(event.skipped)
        )


def rank_failed(record: RunRecord, event: dict, when: str) -> None:
    """A rank failed or hung: close the open attempt with it as the cause, or add it to the last one's."""
    attempt, cause = current(record), cause_of(event)
    if attempt is not None:
        attempt.close(Outcome.HUNG if event.get("kind") == "hung" else Outcome.FAILED, cause, when)
    elif record.attempts:  # another rank's failure in the same incident
        last = record.attempts[-1]
        if cause.exit_type and not (last.cause and last.cause.exit_type) and last.outcome == Outcome.FAILED:
            # A dead process is the root; the error its peers raised (a broken collective) is fallout.
            cause, last.cause = last.cause or Cause(), cause
        last.also.append(cause)


def resize_cause(before: int | None, after: int | None) -> Cause | None:
    """Why a group that did not fail was replaced: an elastic run growing (or shrinking) to another size."""
    if not before or not after or before == after:
        return None
    verb = "grew" if after > before else "shrank"
    return Cause(summary=f"Ray Train's elastic scaling {verb} the group from {before} to {after} workers")


def with_node_id(event: dict, attempt: Attempt | None) -> dict:
    """The event, with the Ray node id its rank ran on (from the attempt's ranks) when it names none."""
    if event.get("node_id") or event.get("rank") is None or not attempt:
        return event
    node_id = next((r.node_id for r in attempt.ranks or [] if r.rank == event["rank"]), None)
    return {**event, "node_id": node_id} if node_id else event


def merge_events(record: RunRecord, run_url: str) -> bool:
    """Fold events written since the last merge into record; True if any were new."""
    new = read_events(run_url, after=record.events_cursor)
    for name, event in new:
        try:
            apply_event(record, event)
        except ValueError as exc:  # a damaged event must not stop the driver; run.json stays well-formed
            log.warning("skipped the event %s of run %s: %s", name, record.run_id, exc)
        record.events_cursor = name
    return bool(new)


def describe_ranks(attempt: dict) -> list[str]:
    """One line per rank of an attempt as `kiln status --json` shows it: node (Ray's id and address), pid."""
    lines = []
    for rank in attempt.get("ranks") or []:
        node = f"{rank['node_id']} ({rank.get('node_address') or '?'})" if rank.get("node_id") else rank.get("node")
        lines.append(f"rank {rank.get('rank', '?')}: node {node or '?'}, pid {rank.get('pid', '?')}")
    return lines


def finished_state(record: RunRecord) -> RunState | None:
    """SUCCEEDED or PREEMPTED if the last attempt's workers said so."""
    last = record.attempts[-1] if record.attempts else None
    return RUN_ENDING.get(last.outcome) if last and last.outcome else None


HEALTH = re.compile(r"hostname='([^']*)'.*?node_ip='([^']*)'.*?pid=(\d+)", re.S)
EXIT = re.compile(r"Worker exit type: (\w+) Worker exit detail: ([^.]*\.)")
NODE_DIED = re.compile(r"its node has died\. Node Id: ([0-9a-f]+)")


def describe_worker_failure(rank: int, exc: BaseException) -> dict[str, str | int]:
    """What Ray says about a failed rank, as a `failed` event's cause fields: summary, node, pid, exit type."""
    text = str(exc)
    cause: dict[str, str | int] = {"rank": rank}
    health = HEALTH.search(text)
    if health:
        cause["node"] = f"{health.group(2)} ({health.group(1)})"
        cause["pid"] = int(health.group(3))
    exited, node_died = EXIT.search(text), NODE_DIED.search(text)
    if node_died:
        cause.update(lost_node_cause(rank, node_died.group(1)))
    elif exited or "actor died" in text or "worker process has died" in text:
        cause["exit_type"] = exited.group(1) if exited else "DIED"
        detail = exited.group(2) if exited else "its process died"
        cause["summary"] = (
            f"rank {rank}'s worker process died ({detail.strip()} killed by a signal such as "
            "SIGKILL, the OOM killer, or a crash; see the worker log)"
        )
    else:
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        lines = [line for line in str(root).strip().splitlines() if line.strip()]
        cause["summary"] = f"{type(root).__name__}: {lines[-1] if lines else ''} (rank {rank})"
    cause["summary"] = redact_text(str(cause["summary"]))
    return cause


def lost_node_cause(rank: int | None, node_id: str) -> dict[str, str]:
    """The cause of a rank whose Ray node died under it."""
    return {
        "exit_type": "NODE_DIED",
        "node_id": node_id,
        "lost_node": node_id,
        "summary": f"rank {rank}'s node {node_id} was lost (its raylet died: the machine failed, was preempted "
        "or was removed); Ray Train restarts the group on the nodes left",
    }


def mark_lost_nodes(record: RunRecord, dead: set[str]) -> bool:
    """Name a dead Ray node as the cause of the failures of the ranks that ran on it; True if any changed.

    Ray's worker errors say only that a worker stopped answering; whether its node died is known from
    Ray's node table a few seconds later, which the driver passes in as `dead` (node ids).
    """
    changed = False
    for attempt in record.attempts:
        cause = attempt.cause or Cause()
        entries = [cause, *attempt.also]
        lost = [e for e in entries if e.node_id in dead and not e.lost_node]
        for entry in lost:
            entry.update(decode(Cause, lost_node_cause(entry.rank, entry.node_id or "")))
        if lost and not cause.lost_node:
            # The lost node is the root; what the other ranks raised (a broken collective) is its fallout.
            root = lost[0]
            attempt.cause = root
            attempt.also = [e for e in entries if e is not root and not e.empty()]
        changed = changed or bool(lost)
    return changed


def record_worker_failures(run_url: str, worker_exceptions: dict[int, BaseException]) -> None:
    """One `failed` event per failed rank (called by Ray's controller)."""
    causes = [describe_worker_failure(rank, exc) for rank, exc in sorted(worker_exceptions.items())]
    for cause in sorted(causes, key=lambda c: "exit_type" not in c):  # dead processes first: the root
        record_event(run_url, "failed", **cause)
