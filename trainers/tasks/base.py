"""The Task interface shared by every task."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from trainers.config import ModelConfig


class Task(Protocol):
    """Builds its model, computes its loss, and evaluates it."""

    def build_model(self, model_cfg: ModelConfig, vocab_size: int, eos_id: int) -> nn.Module:
        """A freshly initialised model for this task."""

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Mean loss of one micro-batch."""

    def evaluate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """This rank's summed validation statistics (callers sum them across ranks)."""

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Validation metrics (`val/...`) from statistics summed over all ranks."""
