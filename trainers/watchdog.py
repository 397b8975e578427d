"""Turning a hang into a failure: a step that outlives train.step_timeout_s ends the worker process.

A rank stuck in a collective (a peer froze, a NIC dropped) would otherwise wait for the process
group's 30-minute timeout, or forever. The watchdog records which rank hung at which step, then exits
the process, so the launcher (Ray Train's FailureConfig) restarts the group from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("kiln.watchdog")

EXIT_HUNG = 124  # what `timeout` uses: recognisable in exit codes


class StepWatchdog:
    """Call beat(step, phase) whenever progress is made; on_hang runs before the process exits."""

    def __init__(
        self, timeout_s: float, rank: int, on_hang: Callable[[dict], None], exit: Callable[[int], None] = os._exit
    ):
        self.timeout_s, self.rank = timeout_s, rank
        self._on_hang, self._exit = on_hang, exit
        self._last = time.monotonic()
        self._step, self._phase = 0, "starting"
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StepWatchdog:
        """Begin watching (a no-op when the timeout is 0)."""
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="kiln-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int, phase: str) -> None:
        """Progress: `phase` of step `step` starts now."""
        self._last, self._step, self._phase = time.monotonic(), step, phase

    def stop(self) -> None:
        """Stop watching."""
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 4)):
            waited = time.monotonic() - self._last
            if waited > self.timeout_s:
                reason = {
                    "rank": self.rank,
                    "last_step": self._step,
                    "phase": self._phase,
                    "waited_s": round(waited, 1),
                    "timeout_s": self.timeout_s,
                    "summary": f"rank {self.rank} hung: {self._phase} after step {self._step} took "
                    f"more than train.step_timeout_s={self.timeout_s:g}s",
                }
                log.error("%s; exiting so the run restarts from its last checkpoint", reason["summary"])
                try:
                    self._on_hang(reason)
                finally:
                    logging.shutdown()
                    self._exit(EXIT_HUNG)
                return
