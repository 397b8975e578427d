"""`kiln train` on Ray: register the run, start (or join) Ray, run Ray Train's TorchTrainer, watch it."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Optional

from rich.console import Console

from data_pipeline import storage
from orchestrator.config import KilnConfig
from orchestrator.progress import MetricsTail, ProgressView
from orchestrator.registry import METRICS_FILE, now
from orchestrator.runs import refresh, start_run
from trainers.loop import run_url
from trainers.secrets import redact_text


class RunFailed(RuntimeError):
    """The training run failed; the message says where and points at the logs."""


@dataclass
class TrainOutcome:
    """What the driver reports when a run ends."""

    run_id: str
    state: str
    step: int
    wall_s: float
    first_val_ppl: Optional[float]
    last_val_ppl: Optional[float]
    checkpoint: Optional[dict]
    run_dir: str


def start_ray(cfg: KilnConfig) -> bool:
    """Connect to cluster.address, or start an embedded local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=cfg.cluster.address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, configure_logging=True,
             runtime_env={"env_vars": {"WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}})
    return True


def ray_storage_path(cfg: KilnConfig) -> str:
    """Ray Train's own bookkeeping folder (ours lives beside it in the run folder)."""
    url = run_url(cfg)
    if storage.is_local(url):
        return storage.join(url, "ray")
    return os.path.join(cfg.data.cache_dir, "ray")


def fit(cfg: KilnConfig) -> None:
    """Run the worker group to completion (blocking); raises what Ray Train raises."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.ray_worker import train_worker

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run.id, storage_path=ray_storage_path(cfg),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)),
    )
    trainer.fit()


def summarize_failure(exc: BaseException, run_dir: str) -> str:
    """One line: the root cause Ray wrapped, and where the worker logs are."""
    root: BaseException = exc
    seen = 0
    while seen < 10:
        inner = getattr(root, "cause", None) or root.__cause__
        errors = getattr(root, "worker_failures", None) or getattr(root, "training_failed_error", None)
        if isinstance(errors, dict) and errors:
            inner = next(iter(errors.values()))
        if inner is None or inner is root:
            break
        root, seen = inner, seen + 1
    lines = [line for line in str(root).strip().splitlines() if line.strip()]
    message = lines[-1] if lines else type(root).__name__
    return redact_text(f"{type(root).__name__}: {message} (worker logs: {storage.join(run_dir, 'logs')})")


def train(cfg: KilnConfig, console: Console) -> TrainOutcome:
    """Run a training job end to end on Ray; the run record tracks it from PENDING to its end."""
    started = time.perf_counter()
    registry, record = start_run(cfg, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    run_dir = registry.run_url(record.run_id)
    console.print(f"run [bold]{record.run_id}[/bold] -> {run_dir}")
    we_started_ray = start_ray(cfg)
    record.state = "RUNNING"
    record.attempts.append({"started": now(), "launcher": "ray"})
    registry.save(record)

    failure: list[BaseException] = []

    def target() -> None:
        try:
            fit(cfg)
        except BaseException as exc:  # reported by the driver thread below
            failure.append(exc)

    worker = threading.Thread(target=target, name="kiln-fit", daemon=True)
    tail = MetricsTail(storage.join(run_dir, METRICS_FILE))
    last_refresh = 0.0
    try:
        with ProgressView(console, cfg.train.max_steps) as view:
            worker.start()
            while worker.is_alive():
                worker.join(timeout=0.5)
                view.update(tail.new_rows())
                if time.monotonic() - last_refresh > 5:
                    refresh(registry, record, cfg, step=tail.last_step)
                    last_refresh = time.monotonic()
            view.update(tail.new_rows())
    except KeyboardInterrupt:
        record.state, record.error = "STOPPED", "interrupted by the user (Ctrl-C)"
        refresh(registry, record, cfg)
        raise
    finally:
        if we_started_ray:
            import ray

            ray.shutdown()
    refresh(registry, record, cfg)
    record.attempts[-1]["ended"] = now()
    if failure:
        record.state = "FAILED"
        record.error = summarize_failure(failure[0], run_dir)
        record.attempts[-1]["error"] = record.error
        registry.save(record)
        raise RunFailed(f"run {record.run_id} failed: {record.error}")
    record.state = "SUCCEEDED" if record.step >= cfg.train.max_steps else "STOPPED"
    registry.save(record)
    return TrainOutcome(record.run_id, record.state, record.step, time.perf_counter() - started,
                        view.first_val_ppl, view.last_val_ppl, record.checkpoint, run_dir)
