"""Optimizer and learning-rate schedule, built the same way for every strategy."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainers.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings); leave biases and norm gains undecayed, as GPT-2 did."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty group (LoRA adapters are all matrices): ZeRO-1/2 drop one, leaving the LR schedule a group short.
    return [group for group in groups if group["params"]]


def adamw_kernels(step_device: str) -> dict[str, bool]:
    """AdamW's implementation for parameters stepped on `step_device` (a torch device type).

    CUDA: the fused kernel (one launch per step for all parameters instead of several per tensor; torch
    supports it for plain, DTensor (FSDP2) and flat ZeRO-partition tensors alike). Elsewhere the
    single-tensor loop, torch's own default on CPU, named here so CPU runs keep their exact numbers.
    """
    return {"fused": True} if step_device == "cuda" else {"foreach": False}


def build_optimizer(model: nn.Module, cfg: OptimConfig, step_device: str) -> torch.optim.Optimizer:
    """AdamW over the model's parameters, with the kernels for the device its step runs on (`adamw_kernels`)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **adamw_kernels(step_device),
    )


def schedule_horizon(cfg: OptimConfig, max_steps: int) -> int:
    """The step the schedule reaches min_lr at: optim.schedule_steps, else (unset) train.max_steps.

    The driver sets optim.schedule_steps when it creates a run; a caller of `trainers.loop.run` that never went
    through the driver (a bare torchrun script, a test) leaves it unset and gets the run's own length.
    """
    return cfg.schedule_steps if cfg.schedule_steps is not None else max_steps


def lr_multiplier(step: int, cfg: OptimConfig, horizon: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr_ratio at `horizon` (`schedule_horizon`).

    Past the horizon the multiplier stays at min_lr_ratio: a run resumed with a larger train.max_steps trains on
    at min_lr rather than jumping back up a stretched cosine.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(1, horizon - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, horizon: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warmup + cosine schedule as a LambdaLR (its state is just the step count)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, horizon))
