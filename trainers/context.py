"""What a training loop needs from whoever launched it: its rank, a way to report, a stop signal."""

from __future__ import annotations

import logging
import os
import signal
from typing import Protocol

log = logging.getLogger("kiln.worker")


class WorkerContext(Protocol):
    """The launcher's side of a worker (Ray Train or torchrun).

    Launchers may also set `launcher` (its name), `node` (where this rank runs) and `stop_reason`
    (why should_stop() turned true); the loop records them in the run's events.
    """

    rank: int
    local_rank: int
    world_size: int

    def report(self, metrics: dict[str, float], step: int, checkpoint: str | None = None) -> None:
        """Hand the latest metrics (and a just-committed checkpoint's URL) to the launcher.

        Every rank calls it at the same steps with the same checkpoint argument, so launchers may
        treat it as a collective.
        """

    def should_stop(self) -> bool:
        """True once the launcher asked this worker to stop early (preemption, `kiln stop`)."""


class StopFlag:
    """Set by SIGTERM/SIGINT so the loop can checkpoint and leave at a step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self.reason: str | None = None

    def install(self) -> None:
        """Catch SIGTERM (and SIGINT) in this process; only possible from the main thread."""
        try:
            signal.signal(signal.SIGTERM, self._set)
            signal.signal(signal.SIGINT, self._set)
        except ValueError:  # not the main thread: the launcher delivers stop requests itself
            pass

    def _set(self, signum, frame) -> None:
        self.requested = True
        self.reason = self.reason or f"{signal.Signals(signum).name} received by a worker (pid {os.getpid()})"


class TorchrunContext:
    """A worker started by `torchrun`: identity from its environment, reports go to the log."""

    launcher = "torchrun"

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self._stop = StopFlag()
        self._stop.install()

    def report(self, metrics: dict[str, float], step: int, checkpoint: str | None = None) -> None:
        if self.rank == 0:
            log.info("step %d %s", step, " ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))

    def should_stop(self) -> bool:
        return self._stop.requested

    @property
    def stop_reason(self) -> str | None:
        """Why this worker was asked to stop."""
        return self._stop.reason
