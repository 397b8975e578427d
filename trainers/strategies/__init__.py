"""Strategies, chosen by `strategy.name` and registered here only."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainers.config import StrategyConfig
from trainers.parallel import Mesh
from trainers.strategies.base import Strategy
from trainers.strategies.ddp import DDPStrategy
from trainers.strategies.deepspeed_zero import DeepSpeedStrategy
from trainers.strategies.fsdp2 import FSDP2Strategy

STRATEGIES: dict[str, Callable[[StrategyConfig, torch.device], Strategy]] = {
    "ddp": DDPStrategy,
    "fsdp": FSDP2Strategy,
    "zero1": DeepSpeedStrategy,
    "zero2": DeepSpeedStrategy,
    "zero3": DeepSpeedStrategy,
    "zero3_offload": DeepSpeedStrategy,
}


def build_strategy(cfg: StrategyConfig, device: torch.device, mesh: Mesh | None = None) -> Strategy:
    """The strategy registered under cfg.name; on a mesh beyond one data axis, FSDP2 on it (the config allows no
    other strategy there)."""
    if mesh is not None:
        return FSDP2Strategy(cfg, device, mesh)
    try:
        return STRATEGIES[cfg.name](cfg, device)
    except KeyError:
        raise ValueError(f"strategy.name={cfg.name!r} is not known; choose one of {', '.join(STRATEGIES)}") from None
