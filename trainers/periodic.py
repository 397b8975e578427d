"""A background thread that calls a function every few seconds: polling a stop request, mirroring logs."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Periodic:
    """Calls fn every every_s seconds on a daemon thread (first call at once) until closed."""

    def __init__(self, fn: Callable[[], None], every_s: float, name: str):
        self._fn, self.every_s = fn, every_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Periodic:
        """Begin calling."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop calling (a call in progress finishes)."""
        self._stopped.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._fn()
            self._stopped.wait(self.every_s)
