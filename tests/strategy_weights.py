"""The whole model's weights from a live strategy, for the suite's "the strategies agree" checks.

Kiln itself never needs them from a live run: `kiln export` consolidates a committed checkpoint's shards
on one CPU process (trainers/export.py), so the strategies do not carry this collective.
"""

from __future__ import annotations

import contextlib
from typing import cast

import torch


def full_model_state(strategy) -> dict[str, torch.Tensor]:
    """Collective: the whole model's weights on CPU, on rank 0 (other ranks may get an empty dict)."""
    from trainers.strategies.ddp import DDPStrategy
    from trainers.strategies.fsdp2 import FSDP2Strategy

    if isinstance(strategy, DDPStrategy):
        return {k: v.detach().cpu() for k, v in strategy.model.module.state_dict().items()}
    if isinstance(strategy, FSDP2Strategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = cast("dict[str, torch.Tensor]", get_model_state_dict(strategy.model, options=options))
        return {k: v.detach() for k, v in state.items()}
    import deepspeed  # the only other kind: DeepSpeedStrategy

    params = list(strategy.engine.module.parameters())
    with (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if strategy.cfg.zero_stage == 3
        else contextlib.nullcontext()
    ):
        return {k: v.detach().cpu().clone() for k, v in strategy.engine.module.state_dict().items()}
