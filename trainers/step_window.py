"""What a worker's training steps leave on its device between two sync steps, and the one collective reading it.

A GPU runs ahead of the host only while nothing reads a tensor back. So a step's loss and grad norm stay on
the device, a non-finite loss is remembered there (`bad_loss`), and the host reads all of it once per sync
step (a logged, evaluated or checkpointed step) in a single all_gather that also carries the timings, peak
memory and the stop flag every rank must agree on. An MoE model's router adds its mean load-balancing loss and the
tokens each layer sent to each expert (`add_router`, from trainers/models.py watch_router) to the same row, after
the task's own step sums (task=dpo's pairs and rewards: `task_columns` of them, between FIELDS and the router's).
`summarize` turns the gathered rows into numbers: a pure function, tested without processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# One row per rank, in this order; then the task's step sums (StepWindow.task_columns), then an MoE model's router
# columns (StepWindow.router_columns).
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
    # MoE only: the routers' load-balancing loss (before router_aux_loss_coef), mean over the window's forwards and the
    # ranks, and, in the least balanced layer, the busiest expert's tokens over the mean expert's (1: balanced).
    moe_aux_loss: float | None = None
    expert_load_max_over_mean: float | None = None
    # The task's step sums (its `train_stats`) of the window's last step, added over the ranks; empty without any.
    task_sums: tuple[float, ...] = ()


def busiest_expert_ratio(tokens: list[float], experts: int) -> float:
    """Tokens per expert, layer after layer: the largest ratio of a layer's busiest expert to its mean expert."""
    layers = [tokens[i : i + experts] for i in range(0, len(tokens), experts)]
    return max((max(layer) * experts / sum(layer) for layer in layers if sum(layer) > 0), default=0.0)


def summarize(rows: list[list[float]], experts: int = 0, task_columns: int = 0) -> WindowSummary:
    """Every rank's gathered window (rows ordered as FIELDS, then the task's task_columns step sums, then an MoE
    model's router columns for its number of experts per layer) as the numbers the run logs and acts on."""
    columns = {name: [row[i] for row in rows] for i, name in enumerate(FIELDS)}
    task_end = len(FIELDS) + task_columns
    task_sums = tuple(sum(column) for column in zip(*(row[len(FIELDS) : task_end] for row in rows), strict=True))
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
        task_sums=task_sums,
        **router_summary([row[task_end:] for row in rows], experts),
    )


def router_summary(rows: list[list[float]], experts: int) -> dict[str, float]:
    """The logged router numbers from every rank's router columns (mean aux loss, then tokens per layer and expert)."""
    if not experts:
        return {}
    # every rank's tokens, added up per (layer, expert)
    tokens = [sum(column) for column in zip(*(row[1:] for row in rows), strict=True)]
    return {
        "moe_aux_loss": sum(row[0] for row in rows) / len(rows),
        "expert_load_max_over_mean": busiest_expert_ratio(tokens, experts),
    }


class StepWindow:
    """Device-side loss, grad norm and non-finite marker of the steps since the last sync, and their timing."""

    def __init__(self, device: torch.device, task_columns: int = 0):
        self.device, self.task_columns = device, task_columns
        self.expert_tokens: torch.Tensor | None = None  # (MoE layers, experts), from an MoE model's first forward
        self.open()

    @property
    def experts(self) -> int:
        """Experts per MoE layer of the router this window reads; 0 for a dense model."""
        return 0 if self.expert_tokens is None else self.expert_tokens.shape[1]

    def open(self) -> None:
        """Start a new window now: after a sync step's evaluation and checkpoint, so they are not timed as training."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss, self.grad_norm, self.bad_loss = zero, zero, zero
        self.task_sums = torch.zeros(self.task_columns, dtype=torch.float64, device=self.device)
        self.started, self.data_wait, self.steps = time.perf_counter(), 0.0, 0
        self.router_loss, self.router_forwards = zero, 0
        if self.expert_tokens is not None:
            self.expert_tokens = torch.zeros_like(self.expert_tokens)

    def add_router(self, aux_loss: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record one training forward's router load-balancing loss and tokens per (layer, expert), on the device."""
        self.router_loss = self.router_loss + aux_loss.detach().to(torch.float64)
        self.router_forwards += 1
        self.expert_tokens = tokens if self.expert_tokens is None else self.expert_tokens + tokens

    def router_columns(self) -> list[torch.Tensor]:
        """The row's router columns: the window's mean load-balancing loss, then its tokens per (layer, expert)."""
        if self.expert_tokens is None:
            return []
        return [(self.router_loss / max(self.router_forwards, 1)).reshape(1), self.expert_tokens.flatten()]

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | float, task_sums: torch.Tensor | None = None) -> None:
        """Record a finished step (its mean loss, and the task's step sums, on the device) without reading anything
        back."""
        self.loss = loss.detach().to(torch.float64)
        if task_sums is not None:
            self.task_sums = task_sums.detach().to(torch.float64)
        self.grad_norm = torch.as_tensor(grad_norm, dtype=torch.float64, device=self.device)
        # NaN and inf are not 0, and a finite step never overwrites a bad one: no host check per step.
        self.bad_loss = torch.where(torch.isfinite(self.loss), self.bad_loss, self.loss)
        self.steps += 1

    def gather(self, stop_asked: bool) -> list[list[float]]:
        """Collective: every rank's window as rows ordered as FIELDS (the one host sync of the window)."""
        timings = [time.perf_counter() - self.started, self.data_wait, float(self.steps), float(stop_asked)]
        host = torch.tensor([*timings, peak_memory_mb(self.device)], dtype=torch.float64)
        losses = torch.stack([self.loss, self.grad_norm, self.bad_loss])
        mine = torch.cat([losses, host.to(self.device), self.task_sums, *self.router_columns()])
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        return torch.stack(rows).cpu().tolist()
