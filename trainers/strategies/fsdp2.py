"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across workers.

Each transformer block is its own FSDP unit (gathered just before use, freed after); the embeddings,
final norm and the tied LM head form the root unit. On a run's mesh (trainers/parallel.py) the model is first
split over its tensor groups, then sharded over the data axes: one (FSDP) or replicate x shard (HSDP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import cast

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from trainers.config import OptimConfig, StrategyConfig
from trainers.models import transformer_blocks
from trainers.parallel import Mesh, apply_tensor_parallel, sharded_logits
from trainers.strategies.base import TorchStrategy


class FSDP2Strategy(TorchStrategy):
    """torch.distributed.fsdp.fully_shard per block, AdamW over the sharded (DTensor) parameters."""

    name = "fsdp"

    def __init__(self, cfg: StrategyConfig, device: torch.device, mesh: Mesh | None = None):
        super().__init__(cfg, device)
        self.mesh = mesh  # None: FSDP2 over the whole world, as fully_shard does by default

    def wrap(
        self, model: nn.Module, optim_cfg: OptimConfig, max_steps: int, micro_batch: int = 1, grad_accum: int = 1
    ) -> nn.Module:
        model.to(self.device)
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        data_mesh = None
        if self.mesh is not None:
            if self.mesh.shape.tensor > 1:
                apply_tensor_parallel(model, self.mesh.tensor_mesh)
            data_mesh = self.mesh.data_mesh
        reshard = self.cfg.reshard_after_forward
        for block in transformer_blocks(model):
            fully_shard(block, mesh=data_mesh, mp_policy=policy, reshard_after_forward=reshard)
        sharded = fully_shard(model, mesh=data_mesh, mp_policy=policy, reshard_after_forward=reshard)
        # fully_shard returns model itself, its class swapped for one deriving from both FSDPModule and the
        # model's own class; torch types it as FSDPModule alone (see _fsdp for the other view)
        self.model = cast(nn.Module, sharded)
        self.build_optimizer(self.model, optim_cfg, max_steps)
        return self.model

    @property
    def tensor_parallel(self) -> bool:
        """Whether the model is split over tensor groups (its logits split by vocabulary)."""
        return self.mesh is not None and self.mesh.shape.tensor > 1

    def autocast(self) -> AbstractContextManager:
        # bf16 is applied by the MixedPrecisionPolicy to the sharded parameters, not by autocast.
        precision = contextlib.nullcontext() if self.precision == "bf16" else super().autocast()
        if not self.tensor_parallel:
            return precision
        stack = contextlib.ExitStack()  # the forward's loss on vocabulary-split logits
        stack.enter_context(precision)
        stack.enter_context(sharded_logits())
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        if not self.tensor_parallel:
            return super().backward(loss)
        with sharded_logits():  # the cross entropy's backward on the split logits
            super().backward(loss)

    @property
    def _fsdp(self) -> FSDPModule:
        """self.model as the FSDPModule that wrap() made it."""
        return cast(FSDPModule, self.model)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self._fsdp.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._fsdp.set_requires_gradient_sync(True)
