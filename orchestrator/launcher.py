"""`kiln train` on Ray: register the run, start (or join) Ray, run Ray Train's TorchTrainer, watch it."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Optional

from rich.console import Console

from data_pipeline import storage
from orchestrator.attempts import current, driver_identity, finished_state, record_worker_failures
from orchestrator.config import KilnConfig
from orchestrator.progress import MetricsTail, ProgressView
from orchestrator.registry import METRICS_FILE, RunRecord, RunRegistry
from orchestrator.runs import refresh, start_run
from trainers.events import record_event, request_stop
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


def attempt_callback(run_dir: str):
    """A Ray Train callback, run in Ray's controller, that records each failed rank as a run event."""
    from ray.train.v2.api.callback import UserCallback

    class AttemptCallback(UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            record_worker_failures(run_dir, worker_exceptions)

    return AttemptCallback()


def fit(cfg: KilnConfig) -> None:
    """Run the worker group to completion (blocking); raises what Ray Train raises."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.ray_worker import KilnTorchConfig, train_worker

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg},
        torch_config=KilnTorchConfig(timeout_s=int(max(cfg.train.step_timeout_s * 2, 600))),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run.id, storage_path=ray_storage_path(cfg),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             callbacks=[attempt_callback(run_url(cfg))]),
    )
    trainer.fit()


class GracefulStop:
    """SIGTERM or a first Ctrl-C asks the workers to checkpoint and stop; a second Ctrl-C aborts."""

    def __init__(self, run_dir: str, console: Console):
        self.run_dir, self.console = run_dir, console
        self.requested: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        self.requested = f"the kiln driver received {name}" + (" (preemption)" if signum == signal.SIGTERM else "")
        request_stop(self.run_dir, self.requested)
        record_event(self.run_dir, "stop_requested", reason=self.requested)
        self.console.print(f"[yellow]{name}: asking the workers to commit a checkpoint and stop "
                           "(Ctrl-C again aborts without one)[/yellow]")


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


def train(cfg: KilnConfig, console: Console, resumed: Optional[tuple[RunRegistry, RunRecord]] = None,
          ) -> TrainOutcome:
    """Run a training job end to end on Ray; the run record tracks it from PENDING to its end.

    `resumed` continues an existing run (`kiln resume`) instead of registering a new one.
    """
    started = time.perf_counter()
    if resumed is None:
        registry, record = start_run(cfg, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    else:
        registry, record = resumed
    run_dir = registry.run_url(record.run_id)
    console.print(f"run [bold]{record.run_id}[/bold] -> {run_dir}")
    record_event(run_dir, "launched", launcher="ray",
                 driver=driver_identity("kiln resume" if resumed else "kiln train"))
    record.state, record.error = "RUNNING", None
    refresh(registry, record, cfg)
    we_started_ray = start_ray(cfg)

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
        with GracefulStop(run_dir, console), ProgressView(console, cfg.train.max_steps) as view:
            worker.start()
            while worker.is_alive():
                worker.join(timeout=0.5)
                view.update(tail.new_rows())
                if time.monotonic() - last_refresh > 5:
                    refresh(registry, record, cfg, step=tail.last_step)
                    last_refresh = time.monotonic()
            view.update(tail.new_rows())
    except KeyboardInterrupt:
        record.state, record.error = "STOPPED", "aborted by the user (Ctrl-C twice) without a final checkpoint"
        refresh(registry, record, cfg)
        raise
    finally:
        if we_started_ray:
            import ray

            ray.shutdown()
    refresh(registry, record, cfg)
    ended = finished_state(record)
    if failure and ended is None:
        record.state = "FAILED"
        last = record.attempts[-1] if record.attempts else {}
        cause = (last.get("cause") or {}).get("summary")
        record.error = (f"{cause} (worker logs: {storage.join(run_dir, 'logs')})" if cause
                        else summarize_failure(failure[0], run_dir))
        if current(record) is not None:
            record.attempts[-1].update(ended=record.updated, outcome="FAILED",
                                       cause={"summary": record.error})
        registry.save(record)
        raise RunFailed(f"run {record.run_id} failed: {record.error}")
    record.state = ended or ("SUCCEEDED" if record.step >= cfg.train.max_steps else "STOPPED")
    registry.save(record)
    return TrainOutcome(record.run_id, record.state, record.step, time.perf_counter() - started,
                        view.first_val_ppl, view.last_val_ppl, record.checkpoint, run_dir)
