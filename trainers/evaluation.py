"""Validation during training: the task's metrics over a fixed slice of the validation split."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from data_pipeline.dataset import Dataset
from data_pipeline.stream import TokenStream
from trainers.distributed import mean_across_ranks
from trainers.strategies import Strategy
from trainers.tasks import Task, task_batch


class Evaluator:
    """val/* metrics every `every` steps, at step 0 and at the last step, averaged over all ranks.

    Each rank reads the first `batches` micro-batches of its own slice of the validation split, in
    order, so every evaluation of a run (and of its resumed continuation) sees the same tokens.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float] | None,
        *,
        task: Task,
        strategy: Strategy,
        device: torch.device,
        rank: int,
        world_size: int,
        micro_batch: int,
        seed: int,
        batches: int,
        every: int,
        last_step: int,
    ):
        self.datasets, self.weights = datasets, weights
        self.task, self.strategy, self.device = task, strategy, device
        self.rank, self.world_size, self.micro_batch, self.seed = rank, world_size, micro_batch, seed
        self.batches, self.every, self.last_step = batches, every, last_step

    def due(self, step: int) -> bool:
        """Whether step `step` ends with an evaluation."""
        return step == 0 or step % self.every == 0 or step == self.last_step

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """The task's validation metrics (a collective: every rank calls it at the same step)."""
        val = TokenStream(
            self.datasets,
            "val",
            rank=self.rank,
            world_size=self.world_size,
            micro_batch=self.micro_batch,
            seed=self.seed,
            shuffle=False,
            weights=self.weights,
        )
        batches = (task_batch(self.task, next(val), "val", self.device) for _ in range(self.batches))
        model.eval()
        try:
            with self.strategy.autocast():
                sums = self.task.evaluate(model, batches)
        finally:
            model.train()
            val.close()
        keys = sorted(sums)
        means = mean_across_ranks([sums[k] for k in keys], self.device)
        return self.task.summarize({k: v * self.world_size for k, v in zip(keys, means, strict=True)})
