"""A run's STOP request: the one file anyone writes to ask a running run to commit a checkpoint and stop.

`kiln stop RUN`, the `kiln train` driver on SIGTERM / a first Ctrl-C, `kiln sweep stop` and the sweep's
ASHA pruning write it (`ask_to_stop`, the one writer); rank 0 of the run polls it between steps
(trainers/preemption.py, `StopRequestWatcher`). The served request is removed when the driver ends or
the run is resumed (`clear_stop_request`), so it never stops the next attempt.
"""

from __future__ import annotations

import json
import time

from data_pipeline import storage
from trainers.run.events import STOP_REQUESTED, record_event
from trainers.run.folder import STOP_REQUEST


def ask_to_stop(run_url: str, reason: str, *, event: str | None = STOP_REQUESTED, **fields: object) -> None:
    """Ask a running run to commit a checkpoint and stop: record who asked (`event`), then leave the request.

    The event comes first so that whoever later reads why the run stopped (a sweep telling a prune from
    a `kiln stop`) finds it before the run can end. `event=None` only re-asks a stop already recorded.
    """
    if event is not None:
        record_event(run_url, event, reason=reason, **fields)
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
