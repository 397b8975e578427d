"""DDP: every worker holds the whole model; gradients are all-reduced after backward."""

from __future__ import annotations

from typing import ContextManager

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from trainers.config import OptimConfig, StrategyConfig
from trainers.optim import build_optimizer, build_scheduler
from trainers.strategies.base import autocast_for, resolve_precision


class DDPStrategy:
    """torch DistributedDataParallel with AdamW and a warmup + cosine schedule."""

    name = "ddp"

    def __init__(self, cfg: StrategyConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.precision = resolve_precision(cfg, device)

    def wrap(self, model: nn.Module, optim_cfg: OptimConfig, max_steps: int) -> nn.Module:
        model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.optim_cfg = optim_cfg
        self.optimizer = build_optimizer(self.model.module, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)
        return self.model

    def autocast(self) -> ContextManager:
        return autocast_for(self.precision, self.device)

    def no_sync(self) -> ContextManager:
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        max_norm = self.optim_cfg.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.module.state_dict().items()}
