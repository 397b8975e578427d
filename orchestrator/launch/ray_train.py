"""`kiln train` on Ray: register the run, start (or join) Ray, run Ray Train's TorchTrainer, watch it."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console

from data_pipeline import storage
from data_pipeline.redaction import redact_text
from orchestrator.cluster.placement import worker_shape
from orchestrator.cluster.ray_handle import dead_nodes, ray_for
from orchestrator.config import ClusterConfig, KilnConfig, UsageError
from orchestrator.launch.driver_watch import (
    POLL_S,
    WORKERS_DONE_GRACE_S,
    CauseSource,
    WatchAction,
    WatchState,
    decide_watch,
    end_state,
    failure_cause_source,
)
from orchestrator.launch.progress import MetricsTail, ProgressView
from orchestrator.run.attempts import current, finished_state, mark_lost_nodes
from orchestrator.run.lifecycle import refresh
from orchestrator.run.liveness import DriverIdentity
from orchestrator.run.record import Cause, Outcome
from orchestrator.run.registry import METRICS_FILE, RunRecord, RunRegistry, now
from trainers.run.events import record_event
from trainers.run.folder import LOGS_DIR, RAY_DIR
from trainers.run.state import RunState
from trainers.run.stop_request import ask_to_stop, clear_stop_request

if TYPE_CHECKING:
    from ray.train import ScalingConfig

    from orchestrator.run.plan import RunPlan
    from trainers.run_data import RunData


class RunFailed(RuntimeError):
    """The training run failed; the message says where and points at the logs."""


@dataclass
class TrainOutcome:
    """What the driver reports when a run ends."""

    run_id: str
    state: str
    step: int
    wall_s: float
    first_val_ppl: float | None
    last_val_ppl: float | None
    checkpoint: dict | None
    run_dir: str
    cluster_address: str | None = None  # the Ray Jobs API a submitted run was submitted to


def ray_storage_path(cfg: KilnConfig) -> str:
    """Ray Train's own bookkeeping folder (ours lives beside it in the run folder)."""
    url = cfg.run_url
    if storage.is_local(url):
        return storage.join(url, RAY_DIR)
    if cfg.data.cache_dir is None:  # finalize() sets it
        raise UsageError("data.cache_dir is unset: the config was not finalized")
    return os.path.join(cfg.data.cache_dir, RAY_DIR)


def scaling_config(cluster: ClusterConfig) -> ScalingConfig:
    """Ray Train's ScalingConfig for the cluster settings: workers, each one's resources, their placement."""
    from ray.train import ScalingConfig

    elastic = {"elastic_resize_monitor_interval_s": cluster.resize_check_s} if cluster.resize_check_s else {}
    return ScalingConfig(
        num_workers=(cluster.min_workers, cluster.max_workers) if cluster.elastic else cluster.num_workers,
        use_gpu=cluster.use_gpu,
        resources_per_worker=worker_shape(cluster.cpus_per_worker, cluster.use_gpu, cluster.resources_per_worker),
        placement_strategy=cluster.placement.upper(),
        **elastic,
    )


def fit(cfg: KilnConfig, data: RunData | None = None) -> None:
    """Run the worker group to completion (blocking); raises what Ray Train raises."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.launch.ray_worker import AttemptCallback, KilnTorchConfig, train_worker

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "data": data},  # data: as the run's plan resolved it
        torch_config=KilnTorchConfig(timeout_s=int(max(cfg.train.step_timeout_s * 2, 600))),
        scaling_config=scaling_config(cfg.cluster),
        run_config=RunConfig(
            name=cfg.run.id,
            storage_path=ray_storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            callbacks=[AttemptCallback(cfg.run_url)],
        ),
    )
    trainer.fit()


class GracefulStop:
    """SIGTERM or a first Ctrl-C asks the workers to checkpoint and stop; a second Ctrl-C aborts."""

    def __init__(self, run_dir: str, console: Console):
        self.run_dir, self.console = run_dir, console
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
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
        ask_to_stop(self.run_dir, self.requested)
        self.console.print(
            f"[yellow]{name}: asking the workers to commit a checkpoint and stop "
            "(Ctrl-C again aborts without one)[/yellow]"
        )


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
    return redact_text(f"{type(root).__name__}: {message} (worker logs: {storage.join(run_dir, LOGS_DIR)})")


def end_unplaced(registry: RunRegistry, record: RunRecord, problem: str) -> None:
    """A run whose workers can never be placed ends FAILED with the reason, its attempt closed."""
    record.state, record.error = RunState.FAILED, problem
    if current(record) is not None:
        record.attempts[-1].close(Outcome.FAILED, Cause(summary=problem), now())
    registry.save(record)


def forget_stop_request(run_dir: str) -> None:
    """The STOP request is served once the driver ends: it must not stop the next attempt."""
    try:
        clear_stop_request(run_dir)
    except OSError as exc:
        logging.getLogger("kiln.driver").warning("could not remove the served stop request: %s", exc)


def train(plan: RunPlan, console: Console, run: tuple[RunRegistry, RunRecord], command: str) -> TrainOutcome:
    """Run a planned, registered run end to end on Ray; the run record tracks it from PENDING to its end.

    `command` is what the run's record says drives it (`kiln train`, `kiln resume`, `kiln start`, a sweep).
    """
    started = time.perf_counter()
    cfg = plan.cfg
    registry, record = run
    run_dir = registry.run_url(record.run_id)
    console.print(f"run [bold]{record.run_id}[/bold] -> {run_dir}")
    record_event(run_dir, "launched", launcher="ray", driver=DriverIdentity.here(command).event_json())
    # Recorded so that `kiln resume` can tell at once whether this process still drives the run.
    record.state, record.error, record.driver = RunState.RUNNING, None, DriverIdentity.here(command).liveness_json()
    refresh(registry, record, cfg)
    try:
        with ray_for(cfg, plan.placement, console, on_unplaced=lambda problem: end_unplaced(registry, record, problem)):
            failure, view = watch(cfg, registry, record, console, plan.data)
    except KeyboardInterrupt:
        record.state, record.error = RunState.STOPPED, "aborted by the user (Ctrl-C twice) without a final checkpoint"
        refresh(registry, record, cfg)
        raise
    finally:
        forget_stop_request(run_dir)
    refresh(registry, record, cfg)
    record.state = end_state(finished_state(record), failure is not None, record.step, cfg.train.max_steps)
    if record.state == RunState.FAILED:
        record_failure(registry, record, failure, run_dir)
        raise RunFailed(f"run {record.run_id} failed: {record.error}")
    registry.save(record)
    wall_s = time.perf_counter() - started
    return TrainOutcome(
        record.run_id,
        record.state,
        record.step,
        wall_s,
        view.first_val_ppl,
        view.last_val_ppl,
        record.checkpoint,
        run_dir,
        record.cluster_address,
    )


def watch(
    cfg: KilnConfig, registry: RunRegistry, record: RunRecord, console: Console, data: RunData | None = None
) -> tuple[BaseException | None, ProgressView]:
    """Run Ray Train in a thread while this one shows progress and keeps run.json fresh.

    Returns what fit() raised (None if it returned) and the progress view (first and last perplexity).
    """
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fit(cfg, data)
        except BaseException as exc:  # reported by the driver thread below
            failure.append(exc)

    run_dir = registry.run_url(record.run_id)
    worker = threading.Thread(target=target, name="kiln-fit", daemon=True)
    tail = MetricsTail(storage.join(run_dir, METRICS_FILE))
    state = WatchState()
    with GracefulStop(run_dir, console), ProgressView(console, cfg.train.max_steps) as view:
        worker.start()
        while worker.is_alive():
            worker.join(timeout=POLL_S)
            view.update(tail.new_rows())
            if decide_watch(state, time.monotonic()) == WatchAction.REFRESH:
                refresh(registry, record, cfg, step=tail.last_step)
                if mark_lost_nodes(record, dead_nodes()):
                    registry.save(record)
                state = state.refreshed(time.monotonic(), finished_state(record))
            # asked again: the refresh just made may be the one that ends the wait
            if decide_watch(state, time.monotonic()) == WatchAction.STOP_WAITING_FOR_RAY:
                console.print(
                    f"[yellow]the workers ended the run {finished_state(record)} but Ray did not "
                    f"return in {WORKERS_DONE_GRACE_S}s; recording their outcome[/yellow]"
                )
                break
        view.update(tail.new_rows())
    if mark_lost_nodes(record, dead_nodes()):
        registry.save(record)
    return (failure[0] if failure else None), view


def record_failure(registry: RunRegistry, record: RunRecord, failure: BaseException | None, run_dir: str) -> None:
    """Save a FAILED run with one line of cause: the attempt's recorded cause, else Ray's root error."""
    last = record.attempts[-1] if record.attempts else None
    cause = last.cause.summary if last and last.cause else None
    source = failure_cause_source(cause, fit_raised=failure is not None)
    if source == CauseSource.RAY_ERROR and failure is not None:
        record.error = summarize_failure(failure, run_dir)
    else:
        record.error = f"{cause} (worker logs: {storage.join(run_dir, LOGS_DIR)})"
    if current(record) is not None:
        record.attempts[-1].close(Outcome.FAILED, Cause(summary=record.error), record.updated)
    registry.save(record)
