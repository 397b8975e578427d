"""DDP: every worker holds the whole model; gradients are all-reduced after backward."""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainers.config import OptimConfig
from trainers.strategies.base import TorchStrategy


class DDPStrategy(TorchStrategy):
    """torch DistributedDataParallel with AdamW and a warmup + cosine schedule."""

    name = "ddp"
    model: DistributedDataParallel  # set by wrap()

    def wrap(
        self, model: nn.Module, optim_cfg: OptimConfig, max_steps: int, micro_batch: int = 1, grad_accum: int = 1
    ) -> nn.Module:
        model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.build_optimizer(self.model.module, optim_cfg, max_steps)
        return self.model

    def no_sync(self) -> AbstractContextManager:
        return self.model.no_sync()
