"""One worker's training loop. Reads top to bottom: set up, restore, train, evaluate, checkpoint.

`run(cfg, ctx)` is all a launcher calls: Ray Train's worker function and plain `torchrun` both end up
here, with a WorkerContext that tells the loop who it is and where to report. The components decide
when they act (`evaluator.due(step)`, `checkpoints.due(step)`, `stops.settle(...)`), so `run` is the
schedule of one step and nothing else. Only sync steps (logged, evaluated or checkpointed) read anything
back from the device or talk to the other ranks (trainers/step_window.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, replace

import torch

from data_pipeline import storage
from data_pipeline.dataset import open_training_data
from data_pipeline.stream import TokenStream
from trainers.checkpoint.schedule import Checkpointing
from trainers.checkpoint.shapes import shapes_of
from trainers.checkpoint.store import CheckpointStore
from trainers.config import WorkerConfig
from trainers.context import WorkerContext
from trainers.device_batches import DeviceBatches
from trainers.distributed import gather_to_rank0, start_worker
from trainers.evaluation import Evaluator
from trainers.failpoints import failpoint
from trainers.flops import mfu, model_flops_per_token, peak_flops, tflops_per_device
from trainers.models import compile_blocks, parameter_count, watch_router
from trainers.optim import schedule_horizon
from trainers.parallel import build_mesh, keep_tensor_groups_on_one_node
from trainers.preemption import StopAgreement, commit_before_stopping
from trainers.reference import ReferencePass, prepare_reference
from trainers.rng import rank_seed, seed_everything
from trainers.run.events import record_event
from trainers.run.folder import CHECKPOINTS_DIR
from trainers.run.state import RunState
from trainers.run_data import RunData, check_run_data
from trainers.step_window import StepWindow, WindowSummary, summarize
from trainers.strategies import Strategy, build_strategy
from trainers.tasks import Task, build_model, build_task
from trainers.tasks.dpo import DPO
from trainers.tracking import Tracker, build_tracker
from trainers.watchdog import StepWatchdog

log = logging.getLogger("kiln.worker")


@dataclass
class LoopResult:
    """How a worker's loop ended."""

    state: RunState  # SUCCEEDED, or PREEMPTED when asked to stop (SIGTERM, `kiln stop`) before max_steps
    step: int
    checkpoint: str | None = None  # the newest committed checkpoint, for the `finished` event


def config_hash(cfg: WorkerConfig) -> str:
    """Hash of what a checkpoint's tensors depend on (model and task), to catch mismatched loads."""
    shape = json.dumps({"model": asdict(cfg.model), "task": asdict(cfg.task)}, sort_keys=True)
    return hashlib.sha256(shape.encode()).hexdigest()[:16]


class Trainer:
    """The pieces of one worker's run, assembled from config, and one optimizer step."""

    def __init__(self, cfg: WorkerConfig, ctx: WorkerContext, data: RunData | None = None):
        self.cfg, self.ctx = cfg, ctx
        train = cfg.train
        self.device = start_worker(ctx.local_rank, train)
        self.url = cfg.run_url
        # What the driver's plan resolved and checked; a caller without a driver (a test) gets the same checks.
        self.data = data or check_run_data(cfg.data, cfg.task.name, cfg.task.labels, cfg.model.vocab_size, log.info)
        self.datasets, self.weights = open_training_data(cfg.data.source, cfg.data.path, cfg.data.mixture)
        self.task: Task = self._task()
        model = self._model()
        self.micro_batch = train.micro_batch
        self.grad_accum = cfg.grad_accum_at(ctx.world_size)
        # The ranks of one tensor group read the same batch: the data is split by data-parallel rank.
        self.mesh_shape = cfg.mesh(ctx.world_size)
        self.data_rank, self.data_ranks = self.mesh_shape.data_rank(ctx.rank), self.mesh_shape.data_parallel
        if self.mesh_shape.tensor > 1:
            where = identity(ctx)
            keep_tensor_groups_on_one_node(self.mesh_shape, str(where.get("node_id") or where["node"]))
        mesh = None if self.mesh_shape.is_trivial else build_mesh(self.mesh_shape, self.device.type)
        self.strategy: Strategy = build_strategy(cfg.strategy, self.device, mesh)
        horizon = schedule_horizon(cfg.optim, train.max_steps)  # fixed when the run started, not moved by a resume
        self.model = self.strategy.wrap(model, cfg.optim, horizon, self.micro_batch, self.grad_accum)
        seed_everything(rank_seed(train.seed, ctx.rank))  # distinct dropout streams per rank
        self.stream = TokenStream(
            self.datasets,
            "train",
            rank=self.data_rank,
            world_size=self.data_ranks,
            micro_batch=self.micro_batch,
            seed=train.seed,
            prefetch=2,
            weights=self.weights,
        )
        self.batches = DeviceBatches(self.stream, self.task, "train", self.device)
        self.checkpoints = self._checkpointing(shapes_of(model))
        self.evaluator = self._evaluator()
        self.tokens_per_step = train.global_batch * self.data.seq_len * self.data.example_rows  # a pair's both rows
        self.peak_flops = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.step = 0
        self.window = StepWindow(self.device, len(self.task.train_stats))
        watch_router(model, self.window.add_router)  # an MoE model's router loss and expert load, logged at syncs

    def _task(self) -> Task:
        """The task the run's model learns, on its data."""
        task_cfg = self.cfg.task
        if self.data.labels is not None:  # the data's classes, which the driver also wrote into the run's config
            task_cfg = replace(task_cfg, labels=list(self.data.labels))
        cfg = self.cfg
        return build_task(task_cfg, self.data.eos_id, seed=cfg.train.seed, vocabulary=self.data.vocabulary, dpo=cfg.dpo)

    def _model(self) -> torch.nn.Module:
        """The model before a strategy wraps it, seeded alike on every rank; counts its parameters and FLOPs."""
        cfg = self.cfg
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        # Built (or, with model.init_from, loaded) on every rank before the strategy wraps it: identical weights.
        model = build_model(self.task, cfg.model, self.data.vocab_size, self.data.eos_id)
        if cfg.model.init_from is not None:
            log.info("rank %d: model from %s (%s)", self.ctx.rank, cfg.model.init_from, type(model).__name__)
        if cfg.model.compile:
            compile_blocks(model)  # before the strategy wraps it: FSDP2 shards each compiled block
        self.num_params = parameter_count(model)
        # Counted before the strategy wraps it: ZeRO-3 leaves each rank's parameters empty outside a forward.
        self.flops_per_token = model_flops_per_token(model, self.data.seq_len)
        return model

    def _checkpointing(self, model_shapes: dict[str, tuple[int, ...]]) -> Checkpointing:
        """This worker's checkpoints: the run's store, saved every train.checkpoint_every steps and at the end."""
        cfg, ctx = self.cfg, self.ctx
        store = CheckpointStore(
            storage.join(self.url, CHECKPOINTS_DIR),
            rank=ctx.rank,
            world_size=ctx.world_size,
            strategy=self.strategy.name,
            mesh=self.mesh_shape.as_json() if cfg.strategy.name == "fsdp" else None,
            config_hash=config_hash(cfg),
            model_shapes=model_shapes,
            keep_last=cfg.checkpoint.keep_last,
            keep_every=cfg.checkpoint.keep_every,
            async_upload=cfg.checkpoint.async_upload,
        )
        every, last = cfg.train.checkpoint_every, cfg.train.max_steps
        return Checkpointing(
            store, self.strategy, self.batches, every=every, last_step=last, seed=cfg.train.seed, rank=ctx.rank
        )

    def _evaluator(self) -> Evaluator:
        """Validation every train.eval_every steps and at the end, over train.eval_batches micro-batches."""
        train = self.cfg.train
        return Evaluator(
            self.datasets,
            self.weights,
            task=self.task,
            strategy=self.strategy,
            device=self.device,
            rank=self.data_rank,
            world_size=self.data_ranks,
            micro_batch=self.micro_batch,
            seed=train.seed,
            batches=train.eval_batches,
            every=train.eval_every,
            last_step=train.max_steps,
        )

    def record_hang(self, reason: dict) -> None:
        """The watchdog's report of a hang, as a `hung` event naming this rank and where it runs."""
        record_event(self.url, "hung", **{**identity(self.ctx), **reason})

    def restore(self) -> dict:
        """Continue from the newest committed checkpoint, if any; returns what happened, for the run's events."""
        self.step, restored = self.checkpoints.restore()
        return restored

    def log_due(self, step: int) -> bool:
        """Whether step `step`'s training metrics are logged."""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def train_step(self) -> None:
        """One optimizer step over grad_accum micro-batches; its loss and grad norm stay on the device (`window`)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        stats_sum: torch.Tensor | None = None  # the task's step sums (task=dpo's pairs and rewards), on the device
        for micro in range(self.grad_accum):
            fetch = time.perf_counter()
            batch = next(self.batches)
            self.window.data_wait += time.perf_counter() - fetch
            last = micro == self.grad_accum - 1
            with contextlib.nullcontext() if last else self.strategy.no_sync():
                with self.strategy.autocast():
                    loss, stats = self.task.loss_and_stats(self.model, batch)
                self.strategy.backward(loss / self.grad_accum)
            loss_sum += loss.detach()  # on the device: reading it here would stall a GPU every micro-batch
            stats_sum = stats if stats_sum is None or stats is None else stats_sum + stats
        grad_norm = self.strategy.step()
        self.step += 1
        self.window.add(loss_sum / self.grad_accum, grad_norm, stats_sum)

    def sync_due(self, step: int) -> bool:
        """Whether step `step` reads its window back: a logged, evaluated or checkpointed step."""
        return self.log_due(step) or self.evaluator.due(step) or self.checkpoints.due(step)

    def sync(self, stop_asked: bool) -> WindowSummary:
        """Collective (one all_gather): the ranks' agreed window; fails on every rank if any saw a non-finite loss."""
        summary = summarize(self.window.gather(stop_asked), self.window.experts, self.window.task_columns)
        if summary.bad is not None:
            rank, value = summary.bad
            first = self.step - self.window.steps + 1
            raise FloatingPointError(
                f"loss is {value} at a step in {first}..{self.step} on rank {rank}; lower optim.lr or check the data"
            )
        return summary

    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics now (a collective)."""
        return self.evaluator(self.model)

    def metrics_for(self, summary: WindowSummary) -> dict[str, float]:
        """The logged training metrics of a sync step, from the ranks' agreed window."""
        metrics = {
            "train/loss": summary.loss,
            "train/lr": self.strategy.current_lr(),
            "train/grad_norm": summary.grad_norm,
            "perf/tokens_per_s": self.tokens_per_step / summary.step_time,
            "perf/step_time_s": summary.step_time,
            "perf/data_wait_frac": summary.data_wait_frac,
            "train/epoch": float(self.batches.epoch),
        }
        tokens_per_s = metrics["perf/tokens_per_s"]
        metrics["perf/tflops"] = tflops_per_device(tokens_per_s, self.flops_per_token, self.ctx.world_size)
        if self.peak_flops:
            metrics["perf/mfu"] = mfu(
                metrics["perf/tokens_per_s"], self.flops_per_token, self.peak_flops, self.ctx.world_size
            )
        held = self.strategy.held_bytes()
        metrics["perf/param_bytes"] = float(held["params"])  # this rank's, rank 0 reports
        metrics["perf/optim_bytes"] = float(held["optim"])
        metrics["perf/master_bytes"] = float(held["master"])
        metrics["perf/peak_mem_mb"] = summary.peak_mem_mb
        if summary.moe_aux_loss is not None:
            metrics["train/moe_aux_loss"] = summary.moe_aux_loss
        if summary.expert_load_max_over_mean is not None:
            metrics["train/expert_load_max_over_mean"] = summary.expert_load_max_over_mean
        return metrics | self.task.train_metrics(list(summary.task_sums))


def identity(ctx: WorkerContext) -> dict:
    """Where this rank runs, for the run's events: node (and Ray's node_id, node_address where known), pid."""
    where = {"rank": ctx.rank, "node": getattr(ctx, "node", None) or socket.gethostname(), "pid": os.getpid()}
    for name in ("node_id", "node_address"):  # a Ray worker's; torchrun has only the hostname
        if getattr(ctx, name, None):
            where[name] = getattr(ctx, name)
    return where


def run(cfg: WorkerConfig, ctx: WorkerContext, data: RunData | None = None) -> LoopResult:
    """Train (or continue training) the run described by cfg on this worker, on the data the driver resolved."""
    trainer = Trainer(cfg, ctx, data)
    watchdog = StepWatchdog(cfg.train.step_timeout_s, ctx.rank, on_hang=trainer.record_hang).start()
    if isinstance(trainer.task, DPO):  # with the initial weights still in the model, before a restore replaces them
        prepare_reference(ReferencePass.of(trainer), watchdog)
    restored = announce_start(trainer, ctx)
    stops = StopAgreement(ctx, trainer.url, trainer.device)
    tracker = open_tracker(cfg, ctx, trainer.url)
    result = LoopResult(RunState.SUCCEEDED, trainer.step, checkpoint=restored.get("restored_from"))
    try:
        if trainer.step == 0:
            metrics = trainer.evaluate()
            tracker.log(metrics, 0)
            ctx.report(metrics, 0)
        trainer.window.open()
        while trainer.step < cfg.train.max_steps:
            with watchdog.phase(trainer.step, "train step"):
                trainer.train_step()
            step = trainer.step
            if failpoint("loop.after_step", run=cfg.run_id, step=step, rank=ctx.rank):
                stops.recheck()  # a test held the run here: a stop asked meanwhile counts from this step
            if not trainer.sync_due(step):
                continue  # no host sync and no collective beyond the gradients' own
            if sync_step(trainer, watchdog, stops, tracker, result):  # every rank stops at the same step
                break
        if trainer.step < cfg.train.max_steps:
            with watchdog.phase(trainer.step, "preemption checkpoint"):
                result.checkpoint = stop_with_checkpoint(trainer, stops.reason) or result.checkpoint
            result.state = RunState.PREEMPTED
    except BaseException:
        tracker.finish(RunState.FAILED)
        raise
    finally:
        watchdog.stop()
        trainer.batches.close()
        stops.close()
    trainer.checkpoints.finish()
    tracker.finish(result.state)
    return announce_end(trainer, result, stops.reason if result.state == RunState.PREEMPTED else None)


def sync_step(
    trainer: Trainer, watchdog: StepWatchdog, stops: StopAgreement, tracker: Tracker, result: LoopResult
) -> bool:
    """The rest of a sync step: the ranks' agreed window, metrics, evaluation and checkpoint when due, the report;
    whether every rank stops here."""
    step, ctx, checkpoints = trainer.step, trainer.ctx, trainer.checkpoints
    with watchdog.phase(step, "sync"):
        summary = trainer.sync(stops.asked())
    metrics = trainer.metrics_for(summary) if trainer.log_due(step) else {}
    if trainer.evaluator.due(step):
        with watchdog.phase(step, "evaluation"):
            metrics.update(trainer.evaluate())
    if metrics:
        tracker.log(metrics, step)
    committed: list[str] = []
    if checkpoints.due(step):
        # Durable before the commit: a restart from this step never lacks its row.
        tracker.flush()
        with watchdog.phase(step, "checkpoint save"):
            committed = checkpoints.save(step)
    result.checkpoint = committed[-1] if committed else result.checkpoint
    if metrics or committed:
        ctx.report(metrics, step)
    trainer.window.open()
    return stops.settle(summary.stop)


def announce_end(trainer: Trainer, result: LoopResult, reason: str | None) -> LoopResult:
    """Rank 0 records the `finished` event (state, step, why it stopped early, newest checkpoint)."""
    result.step = trainer.step
    if trainer.ctx.rank == 0:
        record_event(
            trainer.url, "finished", state=result.state, step=result.step, reason=reason, checkpoint=result.checkpoint
        )
    return result


def announce_start(trainer: Trainer, ctx: WorkerContext) -> dict:
    """Restore, then rank 0 records the `started` event (ranks, nodes, restored step); returns the restore."""
    log.info(
        "rank %d/%d on %s: %s params, grad_accum %d, precision %s",
        ctx.rank,
        ctx.world_size,
        trainer.device,
        f"{trainer.num_params:,}",
        trainer.grad_accum,
        trainer.strategy.precision,
    )
    restored = trainer.restore()
    mesh = trainer.mesh_shape
    where = identity(ctx) | ({} if mesh.is_trivial else {"mesh": mesh.coordinates(ctx.rank)})
    ranks = gather_to_rank0(where)
    if ctx.rank == 0:
        launcher = getattr(ctx, "launcher", "unknown")
        shape = {} if mesh.is_trivial else {"mesh": mesh.as_json()}
        record_event(
            trainer.url, "started", world_size=ctx.world_size, ranks=ranks, launcher=launcher, **shape, **restored
        )
    return restored


def open_tracker(cfg: WorkerConfig, ctx: WorkerContext, url: str) -> Tracker:
    """metrics.jsonl (and W&B when configured) for rank 0; ranks > 0 log nothing."""
    return build_tracker(
        cfg.tracker,
        rank=ctx.rank,
        run_id=cfg.run_id,
        run_name=cfg.run_id,
        run_url=url,
        scratch_dir=cfg.data.cache_dir,
        config=asdict(cfg),
    )


def stop_with_checkpoint(trainer: Trainer, reason: str | None) -> str | None:
    """Commit the current step before leaving early; returns the newest committed checkpoint's URL."""
    checkpoints = trainer.checkpoints

    def save() -> list[str]:
        return checkpoints.save(trainer.step) + checkpoints.finish() if trainer.step > 0 else checkpoints.finish()

    committed = commit_before_stopping(trainer.step, reason, save, trainer.cfg.checkpoint.preempt_grace_s)
    trainer.ctx.report({}, trainer.step)
    return committed[-1] if committed else None
