"""task=dpo's reference pass: the initial model's log-probs of every pair, computed once and committed with the run.

`loop.run` calls `prepare_reference` on every rank before the checkpoint restore, while the model still holds the
weights training starts from (on a fresh start and on a resume alike), so no second model is ever built. A run
whose reference is committed reads it (trainers/checkpoint/reference.py says which, on rank 0).

The pass covers the whole train and val splits in index order, in fixed batches of train.micro_batch pairs: batch k
holds positions [k m, (k + 1) m) of the unshuffled split, and goes to data rank k mod D. That is exactly how the
Evaluator reads val (rank r's batch j is block j D + r), so at step 0 val/rewards/* are exactly 0. Every rank runs
the same number of forwards (FSDP2 and ZeRO-3 gather parameters collectively inside each): a position past the
split's end wraps to its start, as the stream does, and its result is dropped. Each pair is therefore scored by
one rank, and one all_reduce(SUM) gives every rank the whole table.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.batch import Batch
from data_pipeline.dataset import Dataset
from data_pipeline.stream import SplitReader
from trainers.checkpoint import reference as artefact
from trainers.context import WorkerContext
from trainers.distributed import barrier, broadcast_from_rank0
from trainers.lora import adapters_off, is_lora, unwrapped
from trainers.run.events import record_event
from trainers.strategies import Strategy
from trainers.tasks.base import Task, on_device
from trainers.tasks.dpo import DPO, pair_rows
from trainers.watchdog import StepWatchdog

log = logging.getLogger("kiln.reference")


@dataclass(frozen=True)
class ReferenceBatch:
    """One forward of the pass: the split indices it reads, and which of its rows this rank keeps."""

    indices: np.ndarray  # int64 (micro_batch,)
    keep: np.ndarray  # bool (micro_batch,): False past the split's end (a wrapped position, scored elsewhere)


def reference_batches(pairs: int, micro_batch: int, rank: int, world: int) -> list[ReferenceBatch]:
    """Data rank `rank`'s batches of a split of `pairs` pairs: ceil(ceil(pairs / micro_batch) / world) on every rank,
    round j reading block j * world + rank."""
    rounds = math.ceil(math.ceil(pairs / micro_batch) / world)
    batches = []
    for round_ in range(rounds):
        positions = np.arange(micro_batch, dtype=np.int64) + (round_ * world + rank) * micro_batch
        batches.append(ReferenceBatch(positions % pairs, positions < pairs))
    return batches


class Worker(Protocol):
    """What the pass reads of a worker's assembled pieces (trainers/loop.py's Trainer)."""

    url: str
    ctx: WorkerContext
    datasets: list[Dataset]
    task: Task
    model: torch.nn.Module
    strategy: Strategy
    device: torch.device
    data_rank: int
    data_ranks: int
    micro_batch: int


@dataclass
class ReferencePass:
    """What the pass needs of a worker: its model (wrapped, initial weights), the data and the ranks."""

    run_url: str
    dataset: Dataset
    task: DPO
    model: torch.nn.Module
    strategy: Strategy
    device: torch.device
    rank: int
    world_size: int
    data_rank: int
    data_ranks: int
    micro_batch: int

    @classmethod
    def of(cls, trainer: Worker) -> ReferencePass:
        """A worker's pass, from its assembled Trainer (before the restore)."""
        if not isinstance(trainer.task, DPO):
            raise TypeError(f"a reference pass is task=dpo's, not {type(trainer.task).__name__}'s")
        ctx = trainer.ctx
        return cls(
            trainer.url,
            trainer.datasets[0],
            trainer.task,
            trainer.model,
            trainer.strategy,
            trainer.device,
            ctx.rank,
            ctx.world_size,
            trainer.data_rank,
            trainer.data_ranks,
            trainer.micro_batch,
        )

    def pairs(self) -> dict[str, int]:
        """Pairs of each split."""
        return {split: sum(shard.sequences for shard in self.dataset.shards(split)) for split in artefact.SPLITS}

    def data_facts(self) -> dict:
        """What the tables depend on in the data, recorded in the manifest and checked on every read."""
        manifest = self.dataset.manifest
        return {
            "url": self.dataset.url,
            "fingerprint": (manifest.get("source") or {}).get("fingerprint"),
            "tokenizer_sha256": manifest["tokenizer"]["sha256"],
            "pairs": self.pairs(),
        }


def prepare_reference(setup: ReferencePass, watchdog: StepWatchdog) -> None:
    """Collective: attach the run's reference log-probs to its task, computing and committing them if the run has
    none; ReferenceError (one line naming the artefact) on every rank if they cannot be used."""
    url = artefact.reference_url(setup.run_url)
    facts = setup.data_facts()
    decision = broadcast_from_rank0(artefact.decide(url, facts) if setup.rank == 0 else None)
    if decision.action == "refuse":
        raise artefact.ReferenceError(decision.detail)
    if decision.action == "read":
        setup.task.attach_reference(artefact.read(url, decision.detail, facts["pairs"]))
        log.info("rank %d: reference log-probs read from %s", setup.rank, url)
        return
    started = time.perf_counter()
    tables = compute_tables(setup, watchdog)
    seconds = round(time.perf_counter() - started, 3)
    if setup.rank == 0:
        how = {
            "batch_pairs": setup.micro_batch,
            "precision": setup.strategy.precision,
            "lora": is_lora(unwrapped(setup.model)),
            "seconds": seconds,
        }
        world, name = setup.world_size, setup.strategy.name
        digest = artefact.commit(url, tables, world_size=world, strategy=name, data=facts, how=how)
        record_event(setup.run_url, "reference", computed=True, pairs=facts["pairs"], seconds=seconds, sha256=digest)
        log.info("reference log-probs of %s pairs computed in %.1f s: %s", facts["pairs"], seconds, url)
    barrier()  # committed before any rank trains: a rank that fails later leaves a run that reads them
    setup.task.attach_reference(tables)


def compute_tables(setup: ReferencePass, watchdog: StepWatchdog) -> dict[str, np.ndarray]:
    """Collective: every split's (pairs, 2) float32 table, the same on every rank, from the model as it is now with
    its adapters off, in eval mode, without gradients, in the strategy's precision."""
    model = setup.model
    model.eval()
    try:
        with torch.no_grad(), setup.strategy.autocast(), adapters_off(model):
            return {split: split_table(setup, split, watchdog) for split in artefact.SPLITS}
    finally:
        model.train()


def split_table(setup: ReferencePass, split: str, watchdog: StepWatchdog) -> np.ndarray:
    """Collective: one split's table (each pair scored by one data rank, summed over the ranks)."""
    reader = SplitReader(setup.dataset, split, seed=0, shuffle=False)
    try:
        pairs = reader.num_sequences
        table = torch.zeros((pairs, 2), dtype=torch.float64, device=setup.device)
        batches = reference_batches(pairs, setup.micro_batch, setup.data_rank, setup.data_ranks)
        for number, batch in enumerate(batches):
            with watchdog.phase(0, f"reference pass, {split} batch {number + 1} of {len(batches)}"):
                scored = score(setup, reader, batch)
                kept = torch.from_numpy(batch.keep).to(setup.device)
                rows = torch.from_numpy(batch.indices).to(setup.device)[kept]
                table[rows] = scored[kept]
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
        return table.to(torch.float32).cpu().numpy()
    finally:
        reader.close()


def score(setup: ReferencePass, reader: SplitReader, batch: ReferenceBatch) -> torch.Tensor:
    """One batch's (micro_batch, 2) float64 log-probs (chosen, rejected): one forward."""
    rows = [reader.sequence(int(index)) for index in batch.indices]
    pairs = Batch(
        np.stack([row[0] for row in rows]),
        loss_mask=np.stack([row[1] for row in rows if row[1] is not None]),
        indices=batch.indices,
    )
    chosen, rejected, _ = setup.task.answer_logps(setup.model, on_device(pair_rows(pairs), setup.device))
    return torch.stack([chosen, rejected], dim=1).double()
