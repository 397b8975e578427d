"""A run's event log on storage: what happened to its worker groups, for `kiln status` and run.json.

Each event is its own small JSON object under `<run>/events/`, written whole in one PUT: object
stores cannot append, and workers, Ray's controller and the driver may all write events at once
without coordinating. Names sort by time, so listing the folder replays the run's history.

Kinds: `started` (a worker group began: restored step, skipped checkpoints, ranks and nodes),
`failed` (a rank died or raised: cause, rank, node), `hung` (the step watchdog fired),
`finished` (the group ended: SUCCEEDED or PREEMPTED), `stop_requested` (`kiln stop`, a SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from typing import Any

from data_pipeline import storage
from data_pipeline.redaction import redact_text
from trainers.periodic import Periodic
from trainers.run_folder import EVENTS_DIR, STOP_REQUEST


def record_event(run_url: str, kind: str, **fields: Any) -> dict:
    """Write one event (a single object) and return it."""
    moment = time.time()
    event = {
        "kind": kind,
        "time": round(moment, 3),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment)),
        **fields,
    }
    name = f"{int(moment * 1000):015d}-{kind}-{os.getpid()}-{secrets.token_hex(2)}.json"
    storage.write_atomic(storage.join(run_url, EVENTS_DIR, name), redact_text(json.dumps(event, sort_keys=True)))
    return event


def read_events(run_url: str, after: str = "") -> list[tuple[str, dict]]:
    """(name, event) of every event whose name sorts after `after`, oldest first."""
    folder = storage.join(run_url, EVENTS_DIR)
    found = []
    for name in storage.list_names(folder):
        if name > after and name.endswith(".json"):
            try:
                found.append((name, json.loads(storage.read_text(storage.join(folder, name)))))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
    return found


def request_stop(run_url: str, reason: str) -> None:
    """Ask a running run to checkpoint and stop (read by its rank 0 between steps)."""
    storage.write_atomic(storage.join(run_url, STOP_REQUEST), json.dumps({"reason": reason, "time": time.time()}))


def stop_requested(run_url: str) -> dict | None:
    """The pending stop request of a run, if any."""
    try:
        return json.loads(storage.read_text(storage.join(run_url, STOP_REQUEST)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def clear_stop_request(run_url: str) -> None:
    """Forget a served stop request, so the resumed run keeps going."""
    storage.remove(storage.join(run_url, STOP_REQUEST))


class StopRequestWatcher:
    """Rank 0 polls the run's STOP request in the background, so the loop never waits on storage."""

    def __init__(self, run_url: str, every_s: float = 0.5):
        self.run_url = run_url
        self.request: dict | None = None
        self._poller = Periodic(self._poll, every_s, "kiln-stop-poll")

    def start(self) -> StopRequestWatcher:
        """Begin polling."""
        self._poller.start()
        return self

    def close(self) -> None:
        """Stop polling."""
        self._poller.close()

    def _poll(self) -> None:
        if self.request is None:
            with contextlib.suppress(OSError):  # a store hiccup: ask again next round
                self.request = stop_requested(self.run_url)
