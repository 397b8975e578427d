"""Every random stream a worker draws from: seeding at start, and capture/restore for exact resumption."""

from __future__ import annotations

import random
from typing import cast

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's random."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s own streams (dropout), fresh for a resharded restart at `step`."""
    return seed + 1000 * rank + 1 + 7919 * step


def capture_rng() -> dict:
    """Every RNG stream this process draws from, as weights_only-loadable values."""
    # numpy's stubs type the no-argument call as the dict form; the global legacy RandomState
    # returns the MT19937 tuple by default (legacy=True)
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what capture_rng() returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
