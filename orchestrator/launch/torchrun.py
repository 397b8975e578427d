"""`torchrun --nproc-per-node N -m orchestrator.torchrun [overrides]`: the same loop, no Ray.

Rank 0 composes and registers the run, then broadcasts the config, so every rank trains the same
run. This launcher exists to prove `trainers.loop.run` has no hidden Ray coupling and to measure
Kiln's overhead against a bare torch run; it never imports `ray`.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

from data_pipeline.config import default_storage_root
from data_pipeline.redaction import redact_logging, redact_text
from orchestrator.config import UsageError, absolute_url, compose_config
from orchestrator.run.lifecycle import refresh
from orchestrator.run.liveness import DriverIdentity
from orchestrator.run.planning import plan_resume, start_run
from orchestrator.run.registry import UnknownRun
from trainers import loop
from trainers.distributed import broadcast_from_rank0, ensure_process_group, torchrun_backend
from trainers.preemption import StopFlag
from trainers.run.events import record_event
from trainers.run.state import RunState

log = logging.getLogger("kiln.worker")


class TorchrunContext:
    """A worker started by `torchrun`: identity from its environment, reports go to the log."""

    launcher = "torchrun"

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self._stop = StopFlag()
        self._stop.install()

    def report(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0:
            log.info("step %d %s", step, " ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))

    def should_stop(self) -> bool:
        return self._stop.requested

    @property
    def stop_reason(self) -> str | None:
        """Why this worker was asked to stop."""
        return self._stop.reason


def prepare(argv: list[str], world_size: int):
    """Rank 0's setup: a new run from overrides, or `--resume RUN [--storage-root URL] [safe overrides]`."""
    if argv and argv[0] == "--resume":
        if len(argv) < 2:
            raise UsageError("--resume needs a run id")
        run_id, rest = argv[1], argv[2:]
        root = default_storage_root()
        if rest[:1] == ["--storage-root"] and len(rest) > 1:
            root, rest = rest[1], rest[2:]
        plan, registry, record = plan_resume(
            absolute_url(root), run_id, [f"cluster.num_workers={world_size}", *rest], force=True, on_ray=False
        )
    else:
        config = compose_config([f"cluster.num_workers={world_size}", *argv])
        plan, registry, record = start_run(config, on_ray=False)
    record_event(
        registry.run_url(record.run_id),
        "launched",
        launcher="torchrun",
        driver=DriverIdentity.here("torchrun -m orchestrator.torchrun").event_json(),
    )
    record.state, record.error = RunState.RUNNING, None
    refresh(registry, record, plan.cfg)
    return registry, record, plan


def main(argv: list[str]) -> int:
    """Train with torchrun's processes; returns the exit code."""
    ctx = TorchrunContext()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{ctx.rank} %(name)s %(message)s")
    redact_logging()
    # The group exists before rank 0 has composed the config, so it serves both: gradients of a GPU run go over
    # NCCL, the config broadcast over gloo.
    ensure_process_group(torchrun_backend(torch.cuda.is_available()))
    prepared = None
    if ctx.rank == 0:
        try:
            registry, record, plan = prepare(argv, ctx.world_size)
            prepared = (plan.cfg, plan.data)  # every rank trains on the data as rank 0's plan resolved it
        except (UsageError, UnknownRun, ValueError, OSError) as exc:
            print(redact_text(f"kiln torchrun: error: {exc}"), file=sys.stderr)
    prepared = broadcast_from_rank0(prepared)
    if prepared is None:
        dist.destroy_process_group()
        return 2
    cfg, data = prepared
    result = loop.run(cfg, ctx, data)
    if ctx.rank == 0:
        refresh(registry, record, cfg)
        record.state = result.state
        registry.save(record)
        print(f"kiln torchrun: {result.state} run {cfg.run.id} at step {result.step}")
    # Only on the way out of a finished run: after a failure a peer may never join NCCL's teardown.
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
