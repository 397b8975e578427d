"""Causal language modelling: predict each next token; scored by loss and perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from trainers.config import ModelConfig
from trainers.models import build_gpt2


class CausalLM:
    """Next-token prediction over packed sequences."""

    def build_model(self, model_cfg: ModelConfig, vocab_size: int, eos_id: int) -> nn.Module:
        return build_gpt2(model_cfg, vocab_size, eos_id)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        # transformers shifts labels inside the model: position t predicts token t+1.
        return model(input_ids=batch, labels=batch).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Token-weighted summed loss and token count for this rank."""
        total, tokens = 0.0, 0
        for batch in batches:
            predicted = batch.numel() - batch.shape[0]  # the first token of each row has no target
            total += float(model(input_ids=batch, labels=batch).loss) * predicted
            tokens += predicted
        return {"loss_sum": total, "tokens": float(tokens)}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Token-weighted mean loss over all ranks, and its perplexity."""
        loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}
