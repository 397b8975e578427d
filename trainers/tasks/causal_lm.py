"""Causal language modelling: predict each next token; scored by loss, perplexity and top-1 accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from data_pipeline.batch import Batch
from trainers.config import ModelConfig
from trainers.models import build_gpt2
from trainers.parallel import whole
from trainers.tasks.base import IGNORE_INDEX, TaskBase


def correct_next_tokens(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many positions' top-1 prediction is the next target (targets at IGNORE_INDEX not counted)."""
    predicted, wanted = whole(logits)[:, :-1].argmax(dim=-1), targets[:, 1:]
    return int(((predicted == wanted) & (wanted != IGNORE_INDEX)).sum())


def lm_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy from summed statistics."""
    tokens = max(sums["tokens"], 1.0)
    loss = sums["loss_sum"] / tokens
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)), "val/accuracy": sums["correct"] / tokens}


class CausalLM(TaskBase):
    """Next-token prediction over packed sequences; a stored loss mask or labels are ignored."""

    def build_model(self, model_cfg: ModelConfig, vocab_size: int, eos_id: int) -> nn.Module:
        return build_gpt2(model_cfg, vocab_size, eos_id)

    def loss(self, model: nn.Module, batch: Batch[torch.Tensor]) -> torch.Tensor:
        # transformers shifts labels inside the model: position t predicts token t+1.
        return model(input_ids=batch.tokens, labels=batch.tokens).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch[torch.Tensor]]) -> dict[str, float]:
        """Token-weighted summed loss, correct top-1 predictions and token count for this rank."""
        total, correct, tokens = 0.0, 0, 0
        for batch in batches:
            ids = batch.tokens
            predicted = ids.numel() - ids.shape[0]  # the first token of each row has no target
            out = model(input_ids=ids, labels=ids)
            total += float(out.loss) * predicted
            correct += correct_next_tokens(out.logits, ids)
            tokens += predicted
        return {"loss_sum": total, "correct": float(correct), "tokens": float(tokens)}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Token-weighted mean loss over all ranks, its perplexity, and next-token accuracy."""
        return lm_metrics(sums)
