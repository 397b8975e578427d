"""The Strategy interface, and what every strategy shares: optimizer, schedule, precision, accounting."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from trainers.checkpoint.shards import CheckpointedStrategy, FileRecords
from trainers.config import OptimConfig, StrategyConfig
from trainers.optim import build_optimizer, build_scheduler
from trainers.strategies.dcp_io import load_dcp, save_dcp, save_dcp_async


class Strategy(CheckpointedStrategy, Protocol):
    """Everything the loop does that depends on how the model is distributed (checkpoints included: it is
    what trainers/checkpoint/ asks of a strategy, `CheckpointedStrategy`)."""

    name: str
    precision: str

    @property
    def model(self) -> nn.Module:  # read-only here, so a strategy may hold a subclass (DDP's wrapper)
        """What the loop calls forward on."""

    def wrap(
        self, model: nn.Module, optim_cfg: OptimConfig, max_steps: int, micro_batch: int, grad_accum: int
    ) -> nn.Module:
        """Distribute the model and build its optimizer and schedule; returns the model to call.

        max_steps is the schedule's horizon (`trainers.optim.schedule_horizon`), not necessarily train.max_steps.
        """

    def autocast(self) -> AbstractContextManager:
        """The precision context for forward passes."""

    def no_sync(self) -> AbstractContextManager:
        """Skip gradient synchronisation (all but the last micro-batch of an accumulation)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss (already divided by grad_accum)."""

    def step(self) -> torch.Tensor | float:
        """Clip, step optimizer and schedule, zero grads; returns the pre-clip global grad norm (a tensor left
        on the device where the strategy allows, so the loop reads it only at sync steps)."""

    def current_lr(self) -> float:
        """The learning rate the next step uses."""

    # save, save_async, load, extra_state and load_extra_state: CheckpointedStrategy's (trainers/checkpoint/shards.py).

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: parameters, optimizer state, and fp32 master weights (ZeRO only)."""


def resolve_precision(cfg: StrategyConfig, device: torch.device) -> str:
    """fp32, bf16 or fp16 for this device; a choice the hardware cannot do is a config error."""
    if cfg.precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"strategy.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16; "
            "use strategy.precision=fp16 or fp32"
        )
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError(
            "strategy.precision=fp16 needs a CUDA GPU (dynamic loss scaling); "
            "on CPU use strategy.precision=bf16 or fp32"
        )
    return cfg.precision


def use_tf32(cfg: StrategyConfig, precision: str, device_type: str) -> bool:
    """Whether fp32 matmuls run on TF32 tensor cores: fp32 training on a CUDA GPU with strategy.tf32 (the default)."""
    return cfg.tf32 and precision == "fp32" and device_type == "cuda"


def setup_precision(cfg: StrategyConfig, device: torch.device) -> str:
    """The precision this device trains in (`resolve_precision`), with TF32 matmuls switched per `use_tf32`."""
    precision = resolve_precision(cfg, device)
    if device.type == "cuda":
        tf32 = use_tf32(cfg, precision, device.type)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return precision


def tensor_bytes(tensors) -> int:
    """Bytes of the local part of each tensor (a DTensor counts only its local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in a torch optimizer's state."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


class ScheduledStrategy:
    """LR-schedule access shared by every strategy; each keeps its warmup + cosine LambdaLR here."""

    scheduler: torch.optim.lr_scheduler.LambdaLR

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def scheduler_state(self) -> dict:
        """The LR schedule's state (identical on every rank)."""
        return self.scheduler.state_dict()

    def extra_state(self) -> dict:
        state = {"scheduler": self.scheduler_state()}
        scaler = getattr(self, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(self, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])


class TorchStrategy(ScheduledStrategy):
    """Shared by strategies whose optimizer is a plain torch AdamW stepped by us (DDP, FSDP2)."""

    name = "base"
    model: nn.Module  # set by each subclass's wrap()

    def __init__(self, cfg: StrategyConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.precision = setup_precision(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None

    def build_optimizer(self, module: nn.Module, optim_cfg: OptimConfig, max_steps: int) -> None:
        """AdamW and its warmup + cosine schedule (reaching min_lr at step max_steps) over module's parameters."""
        self.optim_cfg = optim_cfg
        self.optimizer = build_optimizer(module, optim_cfg, self.device.type)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)

    def autocast(self) -> AbstractContextManager:
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip(self) -> torch.Tensor:
        """Clip gradients to optim.grad_clip (0: no clipping); returns the total norm before clipping, on the device."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.optim_cfg.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm.detach()

    def step(self) -> torch.Tensor:
        norm = self.clip()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, shards_url: str) -> FileRecords:
        return save_dcp(self.model, self.optimizer, shards_url)

    def save_async(self, shards_url: str, group) -> Callable[[], FileRecords]:
        return save_dcp_async(self.model, self.optimizer, shards_url, group)

    def load(self, shards_url: str, saved_world_size: int | None = None) -> None:
        load_dcp(self.model, self.optimizer, shards_url)  # DCP reshards to any world size by itself

    def held_bytes(self) -> dict[str, int]:
        return {
            "params": tensor_bytes(self.model.parameters()),
            "optim": optimizer_state_bytes(self.optimizer),
            "master": 0,
        }
