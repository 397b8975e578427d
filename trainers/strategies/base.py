"""The Strategy interface: how a model is replicated or sharded, stepped and checkpointed."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol

import torch
from torch import nn

from trainers.config import OptimConfig, StrategyConfig


class Strategy(Protocol):
    """Everything the loop does that depends on how the model is distributed."""

    name: str
    model: nn.Module  # the wrapped model the loop calls forward on

    def wrap(self, model: nn.Module, optim_cfg: OptimConfig, max_steps: int) -> nn.Module:
        """Distribute the model and build its optimizer and schedule; returns the wrapped model."""

    def autocast(self) -> ContextManager:
        """The precision context for forward passes."""

    def no_sync(self) -> ContextManager:
        """Skip gradient synchronisation (all but the last micro-batch of an accumulation)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's (already scaled) loss."""

    def step(self) -> float:
        """Clip, step optimizer and schedule, zero grads; returns the pre-clip global grad norm."""

    def current_lr(self) -> float:
        """The learning rate the last step used."""

    def state_dict(self) -> dict:
        """This rank's model + optimizer state for torch.distributed.checkpoint."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (after DCP filled it in)."""

    def scheduler_state(self) -> dict:
        """The LR schedule's state (identical on every rank)."""

    def load_scheduler_state(self, state: dict) -> None:
        """Restore the LR schedule."""

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU (for export)."""


def resolve_precision(cfg: StrategyConfig, device: torch.device) -> str:
    """fp32 or bf16 for this device; bf16 on hardware without it is a config error."""
    if cfg.precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"strategy.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16; "
                         "use strategy.precision=fp32")
    return cfg.precision


def autocast_for(precision: str, device: torch.device) -> ContextManager:
    """bf16 autocast where asked for, otherwise plain fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
