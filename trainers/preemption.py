"""Stopping early without losing work: every way a run is asked to stop, and how the workers obey.

A run stops early when
- `kiln stop RUN`, the `kiln train` driver on SIGTERM / a first Ctrl-C, `kiln sweep stop` or the
  sweep's ASHA pruning writes the run's STOP request (`ask_to_stop` in trainers/run/stop_request.py); rank 0 polls it
  in the background (`StopRequestWatcher`);
- a worker process gets SIGTERM (a preempted node): the launcher's handler sets the process's
  `StopFlag` (torchrun: `StopFlag.install`; Ray: orchestrator/launch/ray_worker.py, which must replace
  Ray's own handler on the actor's main thread).

Between steps every rank votes (`StopAgreement.agreed`), so all stop at the same step; then the loop
commits a checkpoint of that step within `checkpoint.preempt_grace_s` (`commit_before_stopping`) and
the run ends PREEMPTED, resumable with `kiln resume RUN`. The served request is removed when the
driver ends or the run is resumed (`clear_stop_request`), so it never stops the next attempt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from trainers.context import WorkerContext
from trainers.periodic import Periodic
from trainers.run.stop_request import stop_requested

if TYPE_CHECKING:  # the orchestrator imports StopFlag: torch stays out of its start-up
    import torch

log = logging.getLogger("kiln.worker")


class StopRequestWatcher:
    """Rank 0 polls the run's STOP request in the background, so the loop never waits on storage."""

    def __init__(self, run_url: str, every_s: float = 0.5):
        self.run_url = run_url
        self.request: dict | None = None
        self._poller = Periodic(self.poll, every_s, "kiln-stop-poll")

    def start(self) -> StopRequestWatcher:
        """Begin polling."""
        self._poller.start()
        return self

    def close(self) -> None:
        """Stop polling."""
        self._poller.close()

    def poll(self) -> None:
        """Read the run's STOP request now (the background poller does this every `every_s`)."""
        if self.request is None:
            with contextlib.suppress(OSError):  # a store hiccup: ask again next round
                self.request = stop_requested(self.run_url)


class StopFlag:
    """This process was asked to stop (a signal); the loop reads it between steps."""

    def __init__(self) -> None:
        self.requested = False
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        """Ask the loop to checkpoint and leave at the next step boundary (the first reason is kept)."""
        self.requested = True
        self.reason = self.reason or reason

    def install(self) -> None:
        """Catch SIGTERM (and SIGINT) in this process; only possible from the main thread."""
        try:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        except ValueError:  # not the main thread: the launcher delivers stop requests itself
            pass

    def _on_signal(self, signum, frame) -> None:
        self.request(f"{signal.Signals(signum).name} received by a worker (pid {os.getpid()})")


class StopAgreement:
    """All ranks decide together, between steps, whether to stop now; rank 0 says why."""

    def __init__(self, ctx: WorkerContext, run_url: str, device: torch.device):
        self.ctx, self.device = ctx, device
        self.requests = StopRequestWatcher(run_url).start() if ctx.rank == 0 else None
        self.reason: str | None = None

    def asked(self) -> bool:
        """Whether this rank was asked to stop (a signal, or rank 0 seeing `kiln stop`): local, no collective."""
        return self.ctx.should_stop() or (self.requests is not None and self.requests.request is not None)

    def settle(self, any_asked: bool) -> bool:
        """Given whether any rank asked (agreed in the step's one collective): stop now? Call on all ranks.

        Only a stop costs a further collective: rank 0 gathers what each rank was told, to say why.
        """
        from trainers.distributed import gather_to_rank0

        if not any_asked:
            return False
        signalled = gather_to_rank0(getattr(self.ctx, "stop_reason", None) if self.ctx.should_stop() else None)
        self.reason = self._describe(signalled)
        return True

    def recheck(self) -> None:
        """Rank 0 reads the STOP request now, not at its next poll: the run was held (a failpoint) and goes on."""
        if self.requests is not None:
            self.requests.poll()

    def close(self) -> None:
        """Stop watching the run's STOP request."""
        if self.requests is not None:
            self.requests.close()

    def _describe(self, signalled: list) -> str | None:
        if self.ctx.rank != 0:
            return None
        if self.requests is not None and self.requests.request is not None:
            return str(self.requests.request.get("reason", "stop requested"))
        named = [(rank, reason) for rank, reason in enumerate(signalled) if reason]
        if named:
            rank, reason = named[0]
            return f"rank {rank}: {reason}"
        return "a worker was asked to stop (preemption)"


def commit_before_stopping(step: int, reason: str | None, save: Callable[[], list[str]], grace_s: float) -> list[str]:
    """Commit a checkpoint of `step` now, saying whether it beat checkpoint.preempt_grace_s."""
    started = time.perf_counter()
    log.warning("stopping at step %d: %s; committing a checkpoint", step, reason)
    committed = save()
    took = time.perf_counter() - started
    (log.info if took <= grace_s else log.error)(
        "preemption checkpoint at step %d committed in %.2fs (checkpoint.preempt_grace_s=%g)", step, took, grace_s
    )
    return committed
