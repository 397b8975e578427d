"""A run's attempts, rebuilt from its event log: when each worker group ran, and why it ended.

Workers (rank 0), Ray's controller (via AttemptCallback) and the driver write events; only the driver
folds them into run.json, so the record has one writer.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from typing import Any

from data_pipeline.redaction import redact_text
from orchestrator.registry import RunRecord, now
from trainers.events import read_events, record_event
from trainers.run_state import RunState

DRIVER_LOST = "the driver stopped recording (the kiln process or its machine died) before the attempt ended"


def driver_identity(command: str) -> dict:
    """Who is driving (or stopping) a run, for its record."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": getpass.getuser(), "command": command}


def current(record: RunRecord) -> dict | None:
    """The attempt still running, if any."""
    return record.attempts[-1] if record.attempts and "ended" not in record.attempts[-1] else None


def open_attempt(record: RunRecord, when: str, **fields: Any) -> dict:
    """Start a new attempt."""
    attempt = {"n": len(record.attempts) + 1, "started": when, **fields}
    record.attempts.append(attempt)
    return attempt


def close(attempt: dict, outcome: str, cause: dict | None, when: str) -> None:
    """Mark an attempt ended."""
    attempt.update(ended=when, outcome=outcome)
    if cause:
        attempt["cause"] = cause


CAUSE_FIELDS = (
    "summary",
    "rank",
    "node",
    "node_id",
    "lost_node",
    "pid",
    "exit_type",
    "exit_code",
    "last_step",
    "phase",
)


def cause_of(event: dict) -> dict:
    """The fields of a failed/hung event that explain it."""
    return {k: event[k] for k in CAUSE_FIELDS if event.get(k) is not None}


def apply_event(record: RunRecord, event: dict) -> None:
    """Fold one event into the record's attempts."""
    kind, when = event.get("kind"), event.get("utc", now())
    attempt = current(record)
    if kind == "launched":
        if attempt is not None:
            close(attempt, "DRIVER_LOST", {"summary": DRIVER_LOST}, when)
        open_attempt(record, when, launcher=event.get("launcher"), driver=event.get("driver"))
    elif kind == "started":
        if attempt is None or "world_size" in attempt:  # Ray restarted the group, or a new launcher
            previous = record.attempts[-1].get("world_size") if record.attempts else None
            if attempt is not None:
                close(attempt, "RESTARTED", resize_cause(previous, event.get("world_size")), when)
            attempt = open_attempt(record, when, launcher=event.get("launcher"))
            if previous and event.get("world_size") and previous != event["world_size"]:
                attempt["resized_from"] = previous
        attempt.update(
            world_size=event.get("world_size"),
            ranks=event.get("ranks"),
            restored_step=event.get("restored_step"),
            skipped_checkpoints=event.get("skipped") or [],
            resharded_from=event.get("resharded_from"),
        )
        if event.get("skipped"):
            record.notes.append(
                f"{when}: attempt {attempt['n']} found newer checkpoints that fail verification "
                f"and loaded step {event.get('restored_step')} instead: " + "; ".join(event["skipped"])
            )
    elif kind in ("failed", "hung"):
        event = with_node_id(event, attempt or (record.attempts[-1] if record.attempts else None))
        if attempt is not None:
            close(attempt, "HUNG" if kind == "hung" else "FAILED", cause_of(event), when)
        elif record.attempts:  # another rank's failure in the same incident
            last = record.attempts[-1]
            cause = cause_of(event)
            if "exit_type" in cause and "exit_type" not in last.get("cause", {}) and last["outcome"] == "FAILED":
                # A dead process is the root; the error its peers raised (a broken collective) is fallout.
                cause, last["cause"] = last.get("cause", {}), cause
            last.setdefault("also", []).append(cause)
    elif kind == "finished" and attempt is not None:
        attempt["final_step"] = event.get("step")
        close(
            attempt,
            event.get("state", RunState.SUCCEEDED),
            {"summary": event["reason"]} if event.get("reason") else None,
            when,
        )
    elif kind == "stop_requested":
        record.notes.append(f"{when}: stop requested: {event.get('reason')}")


def resize_cause(before: int | None, after: int | None) -> dict | None:
    """Why a group that did not fail was replaced: an elastic run growing (or shrinking) to another size."""
    if not before or not after or before == after:
        return None
    verb = "grew" if after > before else "shrank"
    return {"summary": f"Ray Train's elastic scaling {verb} the group from {before} to {after} workers"}


def with_node_id(event: dict, attempt: dict | None) -> dict:
    """The event, with the Ray node id its rank ran on (from the attempt's ranks) when it names none."""
    if event.get("node_id") or event.get("rank") is None or not attempt:
        return event
    node_id = next((r.get("node_id") for r in attempt.get("ranks") or [] if r.get("rank") == event["rank"]), None)
    return {**event, "node_id": node_id} if node_id else event


def merge_events(record: RunRecord, run_url: str) -> bool:
    """Fold events written since the last merge into record; True if any were new."""
    new = read_events(run_url, after=record.events_cursor)
    for name, event in new:
        apply_event(record, event)
        record.events_cursor = name
    return bool(new)


def describe_ranks(attempt: dict) -> list[str]:
    """One line per rank of an attempt: the node it ran on (Ray's full node id and address) and its pid."""
    lines = []
    for rank in attempt.get("ranks") or []:
        node = f"{rank['node_id']} ({rank.get('node_address') or '?'})" if rank.get("node_id") else rank.get("node")
        lines.append(f"rank {rank.get('rank', '?')}: node {node or '?'}, pid {rank.get('pid', '?')}")
    return lines


def finished_state(record: RunRecord) -> RunState | None:
    """SUCCEEDED or PREEMPTED if the last attempt's workers said so."""
    last = record.attempts[-1] if record.attempts else None
    ended = last.get("outcome") if last else None
    return RunState(ended) if ended in (RunState.SUCCEEDED, RunState.PREEMPTED) else None


HEALTH = re.compile(r"hostname='([^']*)'.*?node_ip='([^']*)'.*?pid=(\d+)", re.S)
EXIT = re.compile(r"Worker exit type: (\w+) Worker exit detail: ([^.]*\.)")
NODE_DIED = re.compile(r"its node has died\. Node Id: ([0-9a-f]+)")


def describe_worker_failure(rank: int, exc: BaseException) -> dict[str, Any]:
    """What Ray says about a failed rank, as a cause: summary, node, pid, exit type."""
    text = str(exc)
    cause: dict[str, Any] = {"rank": rank}
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
    cause["summary"] = redact_text(cause["summary"])
    return cause


def lost_node_cause(rank: int | None, node_id: str) -> dict[str, Any]:
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
        cause = attempt.get("cause") or {}
        entries = [cause, *attempt.get("also", [])]
        lost = [e for e in entries if e.get("node_id") in dead and not e.get("lost_node")]
        for entry in lost:
            entry.update(lost_node_cause(entry.get("rank"), entry["node_id"]))
        if lost and not cause.get("lost_node"):
            # The lost node is the root; what the other ranks raised (a broken collective) is its fallout.
            root = lost[0]
            attempt["cause"] = root
            attempt["also"] = [e for e in entries if e is not root and e]
            if not attempt["also"]:
                del attempt["also"]
        changed = changed or bool(lost)
    return changed


def record_worker_failures(run_url: str, worker_exceptions: dict[int, BaseException]) -> None:
    """One `failed` event per failed rank (called by Ray's controller)."""
    causes = [describe_worker_failure(rank, exc) for rank, exc in sorted(worker_exceptions.items())]
    for cause in sorted(causes, key=lambda c: "exit_type" not in c):  # dead processes first: the root
        record_event(run_url, "failed", **cause)
