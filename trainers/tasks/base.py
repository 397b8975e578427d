"""The Task interface shared by every task, and the batches it reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, cast

import numpy as np
import torch
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.tokenizer import Vocabulary
from trainers.config import ModelConfig

IGNORE_INDEX = -100  # a target position that has no loss (transformers' and torch's convention)


class Task(Protocol):
    """Builds its model, computes its loss, and evaluates it."""

    def build_model(self, model_cfg: ModelConfig, vocab_size: int, eos_id: int) -> nn.Module:
        """A freshly initialised model for this task."""

    def host_batch(self, batch: Batch[np.ndarray], split: str) -> Batch[np.ndarray]:
        """What the task makes of a stream's batch ("train" or "val") on the host, before it goes to the device."""

    # What a training step sums per rank besides its loss (over its micro-batches), read at sync steps: the step
    # window gathers them with its own row (trainers/step_window.py), then `train_metrics` names them.
    train_stats: tuple[str, ...]

    def loss(self, model: nn.Module, batch: Batch[torch.Tensor]) -> torch.Tensor:
        """Mean loss of one micro-batch."""

    def loss_and_stats(self, model: nn.Module, batch: Batch[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's mean loss and its `train_stats` summed (float64, on the device; None without any)."""

    def train_metrics(self, sums: list[float]) -> dict[str, float]:
        """`train/...` metrics from a step's `train_stats`, summed over micro-batches and ranks."""

    def evaluate(self, model: nn.Module, batches: Iterable[Batch[torch.Tensor]]) -> dict[str, float]:
        """This rank's summed validation statistics (callers sum them across ranks)."""

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Validation metrics (`val/...`) from statistics summed over all ranks."""


class TaskBase:
    """What every task is built with: the run's seed (train.seed) and its tokenizer's ids, for a task that draws
    per-row randomness (task=mlm's masks) or needs special tokens. Tasks that need neither ignore them."""

    train_stats: tuple[str, ...] = ()  # most tasks log their loss alone

    def __init__(self, seed: int = 0, vocabulary: Vocabulary | None = None):
        self.seed, self.vocabulary = seed, vocabulary

    def loss_and_stats(self, model: nn.Module, batch: Batch[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss alone: a task without `train_stats` sums nothing else (every task defines its own `loss`)."""
        return cast(Task, self).loss(model, batch), None

    def train_metrics(self, sums: list[float]) -> dict[str, float]:
        """Nothing beyond train/loss."""
        return {}

    def host_batch(self, batch: Batch[np.ndarray], split: str) -> Batch[np.ndarray]:
        """The batch as stored: most tasks read it unchanged."""
        return batch


def on_device(batch: Batch[np.ndarray], device: torch.device) -> Batch[torch.Tensor]:
    """A stream's batch as tensors on this worker's device (through pinned memory to a GPU: the copy leaves the
    host free; training reads through trainers/device_batches.py, which also reads ahead)."""
    if device.type != "cuda":
        return batch.map(torch.from_numpy)
    return batch.map(lambda array: torch.from_numpy(array).pin_memory().to(device, non_blocking=True))


def task_batch(task: Task, batch: Batch[np.ndarray], split: str, device: torch.device) -> Batch[torch.Tensor]:
    """A stream's batch as the task reads it, on the device: the task's host-side work first, then one copy."""
    return on_device(task.host_batch(batch, split), device)
