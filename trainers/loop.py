"""One worker's training loop. Reads top to bottom: set up, restore, train, evaluate, checkpoint.

`run(cfg, ctx)` is all a launcher calls: Ray Train's worker function and plain `torchrun` both end up
here, with a WorkerContext that tells the loop who it is and where to report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from data_pipeline import storage
from data_pipeline.dataset import Dataset, open_training_data
from data_pipeline.stream import TokenStream
from trainers.checkpoint import CheckpointStore, capture_rng, restore_rng
from trainers.context import WorkerContext
from trainers.distributed import any_rank, ensure_process_group, gather_to_rank0, max_across_ranks, mean_across_ranks
from trainers.events import StopRequestWatcher, record_event
from trainers.flops import flops_per_token, mfu, peak_flops
from trainers.model_shapes import shapes_of
from trainers.models import parameter_count
from trainers.run_folder import CHECKPOINTS_DIR, run_url
from trainers.strategies import Strategy, build_strategy
from trainers.tasks import Task, build_task
from trainers.tracking import Tracker, build_tracker
from trainers.watchdog import StepWatchdog

log = logging.getLogger("kiln.worker")


@dataclass
class LoopResult:
    """How a worker's loop ended."""

    state: str  # SUCCEEDED, or PREEMPTED when asked to stop (SIGTERM, `kiln stop`) before max_steps
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None


def config_hash(cfg: Any) -> str:
    """Hash of what a checkpoint's tensors depend on (model and task), to catch mismatched loads."""
    shape = json.dumps({"model": asdict(cfg.model), "task": asdict(cfg.task)}, sort_keys=True)
    return hashlib.sha256(shape.encode()).hexdigest()[:16]


def pick_device(local_rank: int) -> torch.device:
    """This worker's GPU when it has one, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's random."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """The pieces of one worker's run, assembled from config."""

    def __init__(self, cfg: Any, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx
        self.device = pick_device(ctx.local_rank)
        ensure_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            timeout_s=max(cfg.train.step_timeout_s * 2, 600) if cfg.train.step_timeout_s else 1800,
        )
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.url = run_url(cfg.storage.root, cfg.run.id)
        self.datasets, self.weights = open_training_data(cfg.data.source, cfg.data.path, cfg.data.mixture)
        self.dataset: Dataset = self.datasets[0]  # vocabulary and sequence length of them all
        self.task: Task = build_task(cfg.task.name)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = self.task.build_model(cfg.model, self.dataset.vocab_size, self.dataset.eos_id)
        self.num_params = parameter_count(model)
        self.model_shapes = shapes_of(model)
        self.micro_batch = cfg.train.micro_batch
        self.grad_accum = cfg.train.global_batch // (self.micro_batch * ctx.world_size)
        if self.grad_accum * self.micro_batch * ctx.world_size != cfg.train.global_batch:
            raise ValueError(
                f"train.global_batch={cfg.train.global_batch} is not divisible by "
                f"train.micro_batch ({self.micro_batch}) x world size ({ctx.world_size})"
            )
        self.strategy: Strategy = build_strategy(cfg.strategy, self.device)
        self.model = self.strategy.wrap(model, cfg.optim, cfg.train.max_steps, self.micro_batch, self.grad_accum)
        seed_everything(cfg.train.seed + 1000 * ctx.rank + 1)  # distinct dropout streams per rank
        self.stream = TokenStream(
            self.datasets,
            "train",
            rank=ctx.rank,
            world_size=ctx.world_size,
            micro_batch=self.micro_batch,
            seed=cfg.train.seed,
            prefetch=2,
            weights=self.weights,
        )
        self.checkpoints = CheckpointStore(
            storage.join(self.url, CHECKPOINTS_DIR),
            rank=ctx.rank,
            world_size=ctx.world_size,
            strategy=self.strategy.name,
            config_hash=config_hash(cfg),
            model_shapes=self.model_shapes,
            keep_last=cfg.checkpoint.keep_last,
            keep_every=cfg.checkpoint.keep_every,
            async_upload=cfg.checkpoint.async_upload,
        )
        self.tokens_per_step = cfg.train.global_batch * self.dataset.seq_len
        embedding_params = model.transformer.wpe.weight.numel() if hasattr(model, "transformer") else 0
        self.flops_per_token = flops_per_token(
            self.num_params - embedding_params, cfg.model.n_layer, cfg.model.n_embd, self.dataset.seq_len
        )
        self.peak_flops = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.step = 0
        self.saved_step: int | None = None

    def restore(self) -> dict:
        """Load the newest committed checkpoint, if any; returns what happened, for the run's events."""
        restored = self.checkpoints.restore(self.strategy)
        if restored is None:
            return {"restored_step": None, "skipped": []}
        committed, extra = restored.committed, restored.extra
        self.strategy.load_extra_state(extra.get("strategy") or {"scheduler": extra["scheduler"]})
        self.stream.load_state_dict(extra["stream"])
        self.step = self.saved_step = committed.step
        if restored.resharded_from is None:
            restore_rng(extra["rng"])
        else:
            # Another world size has other ranks: no saved stream is this rank's, so derive fresh ones.
            seed_everything(self.cfg.train.seed + 1000 * self.ctx.rank + 1 + 7919 * committed.step)
            log.info("resharded from %d to %d workers", restored.resharded_from, self.ctx.world_size)
        for reason in restored.skipped:
            log.warning("skipped a newer checkpoint: %s", reason)
        log.info("resumed from %s (step %d)", committed.url, committed.step)
        return {
            "restored_step": committed.step,
            "restored_from": committed.url,
            "skipped": restored.skipped,
            "resharded_from": restored.resharded_from,
        }

    def save(self) -> list[str]:
        """Checkpoint everything needed to continue exactly from this step; returns URLs committed meanwhile."""
        if self.saved_step == self.step:  # never rewrite a committed checkpoint
            return []
        extra = {
            "step": self.step,
            "strategy": self.strategy.extra_state(),
            "stream": self.stream.state_dict(),
            "rng": capture_rng(),
        }
        started = time.perf_counter()
        committed = self.checkpoints.save(self.step, self.strategy, extra)
        blocked = time.perf_counter() - started
        log.info(
            "checkpoint step %d %s in %.2fs",
            self.step,
            "upload started" if self.checkpoints.async_upload else "committed",
            blocked,
        )
        self.saved_step = self.step
        return committed

    def finish_uploads(self) -> list[str]:
        """Wait for a background upload, so the run never ends with one pending."""
        committed = self.checkpoints.wait()
        self.checkpoints.close()
        return committed

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns this rank's raw numbers."""
        started = time.perf_counter()
        data_wait, losses = 0.0, []
        for micro in range(self.grad_accum):
            fetch = time.perf_counter()
            batch = torch.from_numpy(next(self.stream)).to(self.device, non_blocking=True)
            data_wait += time.perf_counter() - fetch
            last = micro == self.grad_accum - 1
            with contextlib.nullcontext() if last else self.strategy.no_sync():
                with self.strategy.autocast():
                    loss = self.task.loss(self.model, batch)
                self.strategy.backward(loss / self.grad_accum)
            losses.append(float(loss.detach()))
        grad_norm = self.strategy.step()
        self.step += 1
        return {
            "loss": sum(losses) / len(losses),
            "grad_norm": grad_norm,
            "step_time": time.perf_counter() - started,
            "data_wait": data_wait,
        }

    def evaluate(self) -> dict[str, float]:
        """val/loss and val/perplexity over the first eval_batches micro-batches of each rank's val slice."""
        val = TokenStream(
            self.datasets,
            "val",
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            micro_batch=self.micro_batch,
            seed=self.cfg.train.seed,
            shuffle=False,
            weights=self.weights,
        )
        batches = (torch.from_numpy(next(val)).to(self.device) for _ in range(self.cfg.train.eval_batches))
        self.model.eval()
        try:
            with self.strategy.autocast():
                sums = self.task.evaluate(self.model, batches)
        finally:
            self.model.train()
            val.close()
        keys = sorted(sums)
        totals = mean_across_ranks([sums[k] for k in keys], self.device)
        world = self.ctx.world_size
        return self.task.summarize({k: v * world for k, v in zip(keys, totals, strict=False)})

    def metrics_for(self, raw: dict[str, float]) -> dict[str, float]:
        """The logged metrics of a step, averaged over ranks."""
        loss, grad_norm, step_time, data_wait = mean_across_ranks(
            [raw["loss"], raw["grad_norm"], raw["step_time"], raw["data_wait"]], self.device
        )
        metrics = {
            "train/loss": loss,
            "train/lr": self.strategy.current_lr(),
            "train/grad_norm": grad_norm,
            "perf/tokens_per_s": self.tokens_per_step / step_time,
            "perf/step_time_s": step_time,
            "perf/data_wait_frac": data_wait / step_time,
            "train/epoch": float(self.stream.epoch),
        }
        if self.peak_flops:
            metrics["perf/mfu"] = mfu(
                metrics["perf/tokens_per_s"], self.flops_per_token, self.peak_flops, self.ctx.world_size
            )
        held = self.strategy.held_bytes()
        metrics["perf/param_bytes"] = float(held["params"])  # this rank's, rank 0 reports
        metrics["perf/optim_bytes"] = float(held["optim"])
        metrics["perf/master_bytes"] = float(held["master"])
        metrics["perf/peak_mem_mb"] = max_across_ranks(peak_memory_mb(self.device), self.device)
        return metrics


def identity(ctx: WorkerContext) -> dict:
    """Where this rank runs, for the run's events (node, pid)."""
    return {"rank": ctx.rank, "node": getattr(ctx, "node", None) or socket.gethostname(), "pid": os.getpid()}


def run(cfg: Any, ctx: WorkerContext) -> LoopResult:
    """Train (or continue training) the run described by cfg on this worker."""
    trainer = Trainer(cfg, ctx)
    train = cfg.train
    log.info(
        "rank %d/%d on %s: %s params, grad_accum %d, precision %s",
        ctx.rank,
        ctx.world_size,
        trainer.device,
        f"{trainer.num_params:,}",
        trainer.grad_accum,
        trainer.strategy.precision,
    )
    watchdog = StepWatchdog(
        train.step_timeout_s,
        ctx.rank,
        on_hang=lambda reason: record_event(trainer.url, "hung", **{**identity(ctx), **reason}),
    ).start()
    restored = trainer.restore()
    ranks = gather_to_rank0(identity(ctx))
    if ctx.rank == 0:
        record_event(
            trainer.url,
            "started",
            world_size=ctx.world_size,
            ranks=ranks,
            launcher=getattr(ctx, "launcher", "unknown"),
            **restored,
        )
    checkpoint = restored.get("restored_from")
    stop_requests = StopRequestWatcher(trainer.url).start() if ctx.rank == 0 else None
    tracker: Tracker = build_tracker(
        cfg.tracker,
        rank=ctx.rank,
        run_id=cfg.run.id,
        run_name=cfg.run.id,
        run_url=trainer.url,
        scratch_dir=cfg.data.cache_dir,
        config=asdict(cfg),
    )
    state, metrics, stop_reason = "SUCCEEDED", {}, None

    def report_committed(urls: list[str], metrics: dict, step: int) -> str | None:
        for url in urls:
            ctx.report(metrics, step, checkpoint=url)
        return urls[-1] if urls else None

    try:
        if trainer.step == 0:
            metrics = trainer.evaluate()
            tracker.log(metrics, 0)
            ctx.report(metrics, 0)
        while trainer.step < train.max_steps:
            asked = ctx.should_stop() or (stop_requests is not None and stop_requests.request is not None)
            if any_rank(asked, trainer.device):  # every rank stops at the same step
                state = "PREEMPTED"
                stop_reason = describe_stop(
                    ctx,
                    stop_requests,
                    gather_to_rank0(getattr(ctx, "stop_reason", None) if ctx.should_stop() else None),
                )
                break
            watchdog.beat(trainer.step, "train step")
            raw = trainer.train_step()
            step, last = trainer.step, trainer.step == train.max_steps
            if not math.isfinite(raw["loss"]):
                raise FloatingPointError(
                    f"loss is {raw['loss']} at step {step} on rank {ctx.rank}; lower optim.lr or check the data"
                )
            metrics = trainer.metrics_for(raw) if step % train.log_every == 0 or last else {}
            if step % train.eval_every == 0 or last:
                watchdog.beat(step, "evaluation")
                metrics.update(trainer.evaluate())
            if metrics:
                tracker.log(metrics, step)
            committed: list[str] = []
            if step % train.checkpoint_every == 0 or last:
                # Durable before the commit: a restart from this step never lacks its row (a re-run after a
                # failed save logs the step again, with the same values).
                tracker.flush()
                watchdog.beat(step, "checkpoint save")
                committed = trainer.save()
            if last:
                watchdog.beat(step, "checkpoint upload")
                committed += trainer.finish_uploads()
            checkpoint = report_committed(committed, metrics, step) or checkpoint
            if metrics and not committed:
                ctx.report(metrics, step)
        if state == "PREEMPTED":
            checkpoint = preempt(trainer, cfg, watchdog, stop_reason, report_committed) or checkpoint
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        watchdog.stop()
        trainer.stream.close()
        if stop_requests is not None:
            stop_requests.close()
    trainer.finish_uploads()
    tracker.finish(state)
    if ctx.rank == 0:
        record_event(trainer.url, "finished", state=state, step=trainer.step, reason=stop_reason, checkpoint=checkpoint)
    return LoopResult(state=state, step=trainer.step, metrics=metrics, checkpoint=checkpoint)


def describe_stop(ctx: WorkerContext, stop_requests: StopRequestWatcher | None, local: list) -> str | None:
    """Rank 0: why the run is stopping early (a `kiln stop`/driver request, or which rank got a signal)."""
    if ctx.rank != 0:
        return None
    if stop_requests is not None and stop_requests.request is not None:
        return str(stop_requests.request.get("reason", "stop requested"))
    signalled = [(rank, reason) for rank, reason in enumerate(local) if reason]
    if signalled:
        rank, reason = signalled[0]
        return f"rank {rank}: {reason}"
    return "a worker was asked to stop (preemption)"


def preempt(trainer: Trainer, cfg: Any, watchdog: StepWatchdog, reason: str | None, report_committed) -> str | None:
    """Commit a checkpoint of the current step now, within checkpoint.preempt_grace_s."""
    started = time.perf_counter()
    log.warning("stopping at step %d: %s; committing a checkpoint", trainer.step, reason)
    watchdog.beat(trainer.step, "preemption checkpoint")
    committed = trainer.save() + trainer.finish_uploads() if trainer.step > 0 else trainer.finish_uploads()
    took = time.perf_counter() - started
    grace = cfg.checkpoint.preempt_grace_s
    (log.info if took <= grace else log.error)(
        "preemption checkpoint at step %d committed in %.2fs (checkpoint.preempt_grace_s=%g)", trainer.step, took, grace
    )
    return report_committed(committed, {}, trainer.step)
