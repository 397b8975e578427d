"""The Ray Train side of a worker: a WorkerContext over `ray.train`, and the function each worker runs."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import ray.train

from data_pipeline import storage
from trainers import loop
from trainers.context import StopFlag


class RayWorkerContext:
    """Rank and reporting from Ray Train's worker context."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.local_rank = context.get_local_rank()
        self.world_size = context.get_world_size()
        self._stop = StopFlag()
        self._stop.install()

    def report(self, metrics: dict[str, float], step: int, checkpoint: Optional[str] = None) -> None:
        # ray.train.report is a collective barrier costing ~1-2 s in Ray Train v2, so Ray only hears
        # of committed checkpoints; live metrics reach the driver through metrics.jsonl instead.
        if checkpoint is not None:
            ray.train.report({**metrics, "step": step, "checkpoint": checkpoint})

    def should_stop(self) -> bool:
        return self._stop.requested


def redirect_output(run_url: str, rank: int) -> str:
    """Send this worker's stdout, stderr and logging to <run>/logs/worker_<rank>.log."""
    folder = storage.join(run_url, "logs") if storage.is_local(run_url) else os.path.abspath("kiln-logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"worker_{rank}.log")
    handle = open(path, "a", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    sys.stdout = sys.stderr = handle
    logging.basicConfig(level=logging.INFO, stream=handle, force=True,
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    return path


def train_worker(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    cfg = config["cfg"]
    context = RayWorkerContext()
    redirect_output(loop.run_url(cfg), context.rank)
    os.environ.setdefault("WANDB_SILENT", "true")
    loop.run(cfg, context)
