"""Turning a hang into a failure: a step that outlives train.step_timeout_s ends the worker process.

A rank stuck in a collective (a peer froze, a NIC dropped) would otherwise wait for the process
group's 30-minute timeout, or forever. The watchdog records which rank hung at which step, then exits
the process, so the launcher (Ray Train's FailureConfig) restarts the group from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("kiln.watchdog")

EXIT_HUNG = 124  # what `timeout` uses: recognisable in exit codes


class StepWatchdog:
    """Wrap each phase of a step in `phase(step, name)`; one that outlives the timeout ends the process.

    `clock` and `exit` are injectable so the decision (`overdue`) is tested without threads or sleeps.
    """

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        on_hang: Callable[[dict], object],
        exit: Callable[[int], object] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.timeout_s, self.rank = timeout_s, rank
        self._on_hang, self._exit, self._clock = on_hang, exit, clock
        self._since = clock()
        self._step, self._phase = 0, "starting"
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StepWatchdog:
        """Begin watching on a daemon thread (a no-op when the timeout is 0)."""
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="kiln-watchdog", daemon=True)
            self._thread.start()
        return self

    @contextlib.contextmanager
    def phase(self, step: int, name: str) -> Iterator[None]:
        """`name` of step `step` runs inside this block; the time after it counts as `after <name>`."""
        self._enter(step, name)
        yield
        self._enter(step, f"after {name}")

    def overdue(self) -> dict | None:
        """The hang report when the current phase has run past the timeout, else None."""
        waited = self._clock() - self._since
        if self.timeout_s <= 0 or waited <= self.timeout_s:
            return None
        return {
            "rank": self.rank,
            "last_step": self._step,
            "phase": self._phase,
            "waited_s": round(waited, 1),
            "timeout_s": self.timeout_s,
            "summary": f"rank {self.rank} hung: {self._phase} after step {self._step} took "
            f"more than train.step_timeout_s={self.timeout_s:g}s",
        }

    def fire(self, reason: dict) -> None:
        """Record the hang, then end the process so the launcher restarts the group."""
        log.error("%s; exiting so the run restarts from its last checkpoint", reason["summary"])
        try:
            self._on_hang(reason)
        finally:
            logging.shutdown()
            self._exit(EXIT_HUNG)

    def stop(self) -> None:
        """Stop watching."""
        self._stopped.set()

    def _enter(self, step: int, name: str) -> None:
        self._since, self._step, self._phase = self._clock(), step, name

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 4)):
            reason = self.overdue()
            if reason is not None:
                self.fire(reason)
                return
