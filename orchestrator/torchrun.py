"""`torchrun --nproc-per-node N -m orchestrator.torchrun [overrides]`: the same loop, no Ray.

Rank 0 composes and registers the run, then broadcasts the config, so every rank trains the same
run. This launcher exists to prove `trainers.loop.run` has no hidden Ray coupling and to measure
Kiln's overhead against a bare torch run; it never imports `ray`.
"""

from __future__ import annotations

import logging
import os
import sys

from orchestrator.config import UsageError, compose_config
from orchestrator.registry import now
from orchestrator.runs import refresh, start_run
from trainers import loop
from trainers.context import TorchrunContext
from trainers.distributed import broadcast_from_rank0, ensure_process_group


def main(argv: list[str]) -> int:
    """Train with torchrun's processes; returns the exit code."""
    ctx = TorchrunContext()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{ctx.rank} %(name)s %(message)s")
    ensure_process_group("nccl" if os.environ.get("KILN_TORCHRUN_NCCL") else "gloo")
    prepared = None
    if ctx.rank == 0:
        try:
            cfg = compose_config([f"cluster.num_workers={ctx.world_size}", *argv])
            registry, record = start_run(cfg)
            record.state = "RUNNING"
            record.attempts.append({"started": now(), "launcher": "torchrun"})
            registry.save(record)
            prepared = cfg
        except (UsageError, ValueError) as exc:
            print(f"kiln torchrun: error: {exc}", file=sys.stderr)
    cfg = broadcast_from_rank0(prepared)
    if cfg is None:
        return 2
    result = loop.run(cfg, ctx)
    if ctx.rank == 0:
        record.state = result.state
        record.attempts[-1]["ended"] = now()
        refresh(registry, record, cfg)
        print(f"kiln torchrun: {result.state} run {cfg.run.id} at step {result.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
