"""A run's event log on storage: what happened to its worker groups, for `kiln status` and run.json.

Each event is its own small JSON object under `<run>/events/`, written whole in one PUT: object
stores cannot append, and workers, Ray's controller and the driver may all write events at once
without coordinating. Names sort by time, so listing the folder replays the run's history.

Kinds: `started` (a worker group began: restored step, skipped checkpoints, ranks and nodes),
`failed` (a rank died or raised: cause, rank, node), `hung` (the step watchdog fired),
`finished` (the group ended: SUCCEEDED or PREEMPTED), `stop_requested` (`kiln stop`, a SIGTERM).
"""

from __future__ import annotations

import json
import os
import secrets
import time

from data_pipeline import storage
from data_pipeline.redaction import redact_text
from trainers.run.folder import EVENTS_DIR

STOP_REQUESTED = "stop_requested"  # a stop asked by a person, a signal or a sweep (trainers/preemption.py)


def record_event(run_url: str, kind: str, **fields: object) -> dict[str, object]:
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
