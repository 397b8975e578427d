"""What a worker's training steps leave on its device between two sync steps, and the one collective reading it.

A GPU runs ahead of the host only while nothing reads a tensor back. So a step's loss and grad norm stay on
the device, a non-finite loss is remembered there (`bad_loss`), and the host reads all of it once per sync
step (a logged, evaluated or checkpointed step) in a single all_gather that also carries the timings, peak
memory and the stop flag every rank must agree on. `summarize` turns the gathered rows into numbers: a pure
function, tested without processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# One row per rank, in this order.
FIELDS = ("loss", "grad_norm", "bad_loss", "seconds", "data_wait", "steps", "stop", "peak_mem_mb")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass(frozen=True)
class WindowSummary:
    """The ranks' windows, agreed: means of loss, grad norm and time per step; the largest peak memory."""

    loss: float
    grad_norm: float
    step_time: float  # wall-clock seconds per training step over the window (evaluation and saving excluded)
    data_wait_frac: float  # share of that time spent waiting for batches
    peak_mem_mb: float
    stop: bool  # some rank was asked to stop
    bad: tuple[int, float] | None  # (rank, value) of the first rank that saw a non-finite loss


def summarize(rows: list[list[float]]) -> WindowSummary:
    """Every rank's gathered window (rows ordered as FIELDS) as the numbers the run logs and acts on."""
    columns = {name: [row[i] for row in rows] for i, name in enumerate(FIELDS)}
    seconds = sum(columns["seconds"]) / len(rows)
    steps = max(columns["steps"][0], 1.0)
    bad = next(((rank, value) for rank, value in enumerate(columns["bad_loss"]) if value != 0.0), None)
    return WindowSummary(
        loss=sum(columns["loss"]) / len(rows),
        grad_norm=sum(columns["grad_norm"]) / len(rows),
        step_time=seconds / steps,
        data_wait_frac=(sum(columns["data_wait"]) / len(rows)) / seconds if seconds > 0 else 0.0,
        peak_mem_mb=max(columns["peak_mem_mb"]),
        stop=any(flag > 0 for flag in columns["stop"]),
        bad=bad,
    )


class StepWindow:
    """Device-side loss, grad norm and non-finite marker of the steps since the last sync, and their timing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.open()

    def open(self) -> None:
        """Start a new window now: after a sync step's evaluation and checkpoint, so they are not timed as training."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss, self.grad_norm, self.bad_loss = zero, zero, zero
        self.started, self.data_wait, self.steps = time.perf_counter(), 0.0, 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | float) -> None:
        """Record a finished step (its mean loss on the device) without reading anything back."""
        self.loss = loss.detach().to(torch.float64)
        self.grad_norm = torch.as_tensor(grad_norm, dtype=torch.float64, device=self.device)
        # NaN and inf are not 0, and a finite step never overwrites a bad one: no host check per step.
        self.bad_loss = torch.where(torch.isfinite(self.loss), self.bad_loss, self.loss)
        self.steps += 1

    def gather(self, stop_asked: bool) -> list[list[float]]:
        """Collective: every rank's window as rows ordered as FIELDS (the one host sync of the window)."""
        timings = [time.perf_counter() - self.started, self.data_wait, float(self.steps), float(stop_asked)]
        host = torch.tensor([*timings, peak_memory_mb(self.device)], dtype=torch.float64)
        mine = torch.cat([torch.stack([self.loss, self.grad_norm, self.bad_loss]), host.to(self.device)])
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        return torch.stack(rows).cpu().tolist()
