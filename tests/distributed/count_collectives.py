"""Under torchrun: train a run while counting every torch.distributed collective, per training step.

    torchrun --standalone --nproc-per-node 2 tests/distributed/count_collectives.py OUT.json OVERRIDES...

Each public collective of torch.distributed is wrapped; the count restarts when a training step begins,
so a step's count covers the step itself and what the loop does after it (sync, evaluation, checkpoint,
stop agreement) until the next one. DDP's gradient all-reduce runs inside its C++ reducer, not through
these functions: a count of 0 means "nothing beyond the gradient sync".
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import torch.distributed as dist

from orchestrator.launch import torchrun
from trainers import loop

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "gather_object",
    "reduce",
    "reduce_scatter_tensor",
    "barrier",
)

per_step: dict[int, Counter] = {}
current = {"step": 0}  # the step being counted: set when Trainer.train_step starts it


def counted(name: str, fn):
    def wrapper(*args, **kwargs):
        per_step.setdefault(current["step"], Counter())[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def main(out: str, overrides: list[str]) -> int:
    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    train_step = loop.Trainer.train_step

    def counting_train_step(self):
        current["step"] = self.step + 1
        return train_step(self)

    loop.Trainer.train_step = counting_train_step
    code = torchrun.main(overrides)
    if int(os.environ["RANK"]) == 0:  # torchrun.main has destroyed the process group by now
        with open(out, "w") as f:
            json.dump({str(step): dict(counts) for step, counts in per_step.items()}, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
