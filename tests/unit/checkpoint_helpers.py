"""A tiny model under a strategy, stepped and checkpointed: what the checkpoint tests build on."""

from __future__ import annotations

import torch
from torch import nn

from trainers.checkpoint import CheckpointStore
from trainers.config import OptimConfig, StrategyConfig
from trainers.strategies import build_strategy

ZERO = {"zero1": (1, False), "zero3_offload": (3, True)}


def strategy(name: str = "ddp"):
    """A seeded two-layer model wrapped by the named strategy (fp32, CPU)."""
    torch.manual_seed(0)
    stage, offload = ZERO.get(name, (0, False))
    s = build_strategy(
        StrategyConfig(
            name=name, precision="fp32", zero_stage=stage, offload_optimizer=offload, offload_params=offload
        ),
        torch.device("cpu"),
    )
    s.wrap(
        nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)),
        OptimConfig(warmup_steps=0),
        max_steps=10,
        micro_batch=3,
        grad_accum=1,
    )
    return s


def train_one_step(s) -> None:
    """One optimizer step on a random batch."""
    loss = s.model(torch.randn(3, 4)).pow(2).mean()
    s.backward(loss)
    s.step()


def weights(s) -> dict:
    """A copy of the full model state."""
    return {k: v.clone() for k, v in s.full_model_state().items()}


def store_at(tmp_path, name: str = "ddp", **options) -> CheckpointStore:
    """A one-rank CheckpointStore under tmp_path/checkpoints."""
    return CheckpointStore(
        str(tmp_path / "checkpoints"), rank=0, world_size=1, strategy=name, config_hash="h", **options
    )


def save_two(tmp_path, name: str = "ddp"):
    """Two committed checkpoints (steps 1 and 2) and the weights each holds."""
    s, store = strategy(name), store_at(tmp_path, name)
    saved = {}
    for step in (1, 2):
        train_one_step(s)
        store.save(step, s, {"step": step})
        saved[step] = weights(s)
    return store, saved
