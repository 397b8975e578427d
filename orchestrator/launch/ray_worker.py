"""Kiln's side of Ray Train: a WorkerContext over `ray.train`, the function each worker runs, the controller's callback.

Imported only inside functions (orchestrator/launch/ray_train.py's `fit`), so `kiln status` never imports Ray Train.

Ray Train's controller unpickles KilnTorchConfig and train_worker, so it imports this module: the training
stack (trainers.loop: torch's distributed checkpointing, transformers, the tokenizer) is imported by
train_worker instead, on the workers only. At the top it cost the controller ~2 s of CPU before it started
the worker group (benchmarks/startup.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

import ray.train
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend
from ray.train.v2.api.callback import UserCallback

from data_pipeline import storage
from data_pipeline.redaction import redact_logging, redact_text
from orchestrator.run.attempts import record_worker_failures
from trainers.periodic import Periodic
from trainers.preemption import StopFlag
from trainers.run.folder import LOGS_DIR, worker_log_name

# Set by the SIGTERM handler below; read by the training thread between steps.
STOP = StopFlag()
TRAINING = threading.Event()  # a training loop is running in this process
_ray_sigterm_handler: list = []


def on_sigterm(signum, frame) -> None:
    """Preemption: while training, ask the loop to checkpoint and stop instead of exiting at once."""
    if TRAINING.is_set():
        STOP.request(f"SIGTERM received by a worker (pid {os.getpid()}): preempted")
        return
    previous = _ray_sigterm_handler[0] if _ray_sigterm_handler else signal.SIG_DFL
    if callable(previous):
        previous(signum, frame)  # outside training, Ray's own shutdown behaviour
    else:
        sys.exit(128 + signum)


def install_sigterm_handler() -> None:
    """Run on each worker's main thread: Python signal handlers can only be installed there."""
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    if previous is not on_sigterm:
        _ray_sigterm_handler[:] = [previous]


class KilnTorchBackend(_TorchBackend):
    """Ray Train's torch backend, plus our SIGTERM handler on every worker before training starts.

    Ray runs the train function in a thread and gives SIGTERM a handler that exits the process; a
    backend's on_start executes on each worker actor's main thread, the one place that can replace it.
    """

    def on_start(self, worker_group, backend_config) -> None:
        super().on_start(worker_group, backend_config)
        worker_group.execute(install_sigterm_handler)


@dataclass
class KilnTorchConfig(TorchConfig):
    """TorchConfig whose backend is KilnTorchBackend."""

    @property
    def backend_cls(self):
        return KilnTorchBackend


class AttemptCallback(UserCallback):
    """Runs in Ray Train's controller: records each failed rank as an event of the run."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def after_exception(self, run_context: object, worker_exceptions: dict[int, BaseException]) -> None:
        record_worker_failures(self.run_dir, worker_exceptions)


class RayWorkerContext:
    """Rank and reporting from Ray Train's worker context."""

    launcher = "ray"

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.local_rank = context.get_local_rank()
        self.world_size = context.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()  # full hex: `ray list nodes` matches it
        self.node_address = ray.util.get_node_ip_address()
        self.node = f"{self.node_address} ({self.node_id[:12]})"

    def report(self, metrics: dict[str, float], step: int) -> None:
        # Nothing goes to Ray: ray.train.report is a collective barrier costing ~1-2 s in Ray Train v2,
        # and Kiln keeps neither metrics nor checkpoints in Ray. The driver tails metrics.jsonl and the
        # run's events, and restores from the CheckpointStore, which works the same without Ray.
        return None

    def should_stop(self) -> bool:
        return STOP.requested

    @property
    def stop_reason(self) -> str | None:
        """Why this worker was asked to stop."""
        return STOP.reason


class LogMirror:
    """Copies a worker's local log file into the run folder on object storage every few seconds."""

    def __init__(self, path: str, url: str, every_s: float = 10.0):
        self.path, self.url = path, url
        self._copier = Periodic(self.upload, every_s, "kiln-log-mirror")

    def start(self) -> LogMirror:
        """Begin copying."""
        self._copier.start()
        return self

    def close(self) -> None:
        """Copy one last time and stop."""
        self._copier.close()
        self.upload()

    def upload(self) -> None:
        """Copy the log now (a failure is retried next round, never raised into training)."""
        try:
            with open(self.path, "rb") as handle:
                storage.write_atomic(self.url, redact_text(handle.read().decode("utf-8", errors="replace")))
        except OSError as exc:
            logging.getLogger("kiln.worker").warning("could not copy the log to %s: %s", self.url, exc)


def redirect_output(run_url: str, rank: int, local_dir: str) -> str:
    """Send this worker's stdout, stderr and logging to worker_<rank>.log (the run's logs/ when local)."""
    folder = storage.join(run_url, LOGS_DIR) if storage.is_local(run_url) else local_dir
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, worker_log_name(rank))
    handle = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (stays open: fds 1 and 2 point at it)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    sys.stdout = sys.stderr = handle
    logging.basicConfig(
        level=logging.INFO,
        stream=handle,
        force=True,
        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s",
    )
    redact_logging()
    return path


def train_worker(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    cfg = config["cfg"]
    context = RayWorkerContext()
    url = cfg.run_url
    local_logs = os.path.join(cfg.data.cache_dir, LOGS_DIR, cfg.run.id)
    path = redirect_output(url, context.rank, local_logs)
    mirror = (
        None
        if storage.is_local(url)
        else LogMirror(path, storage.join(url, LOGS_DIR, worker_log_name(context.rank))).start()
    )
    os.environ.setdefault("WANDB_SILENT", "true")
    from trainers import loop  # here, not at the top: see the module's docstring

    TRAINING.set()
    try:
        loop.run(cfg, context, config.get("data"))  # the data as the driver's plan resolved it
    finally:
        TRAINING.clear()
        if mirror is not None:
            mirror.close()
