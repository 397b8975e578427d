"""Supervised fine-tuning: causal LM loss only on the tokens a chat loss mask marks (the replies).

`kiln prepare kind=chat` stores mask[t] = 1 where token t is to be learned (assistant text and the
final EOS). Token t is predicted at position t - 1, so the targets are the tokens themselves with
IGNORE_INDEX where the mask is 0, shifted against the logits exactly as transformers shifts labels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.batch import Batch
from trainers.config import ModelConfig
from trainers.models import build_gpt2, router_aux_loss
from trainers.parallel import local
from trainers.tasks.base import IGNORE_INDEX, TaskBase
from trainers.tasks.causal_lm import correct_next_tokens, lm_metrics


def masked_targets(batch: Batch[torch.Tensor]) -> torch.Tensor:
    """The tokens to predict: each token where its loss mask is 1, IGNORE_INDEX elsewhere."""
    if batch.loss_mask is None:
        raise ValueError("task=sft needs batches with a loss mask (data prepared with `kiln prepare kind=chat`)")
    return batch.tokens.masked_fill(batch.loss_mask == 0, IGNORE_INDEX)


def masked_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross entropy over the learned targets, how many there are)."""
    wanted = targets[:, 1:].reshape(-1)
    per_token = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # fp32 loss, as transformers does
    total = F.cross_entropy(per_token, wanted, ignore_index=IGNORE_INDEX, reduction="sum")  # loss parallel: replicated
    return local(total), (wanted != IGNORE_INDEX).sum()


class SFT(TaskBase):
    """Causal LM fine-tuning on chat data, learning only the replies."""

    def build_model(self, model_cfg: ModelConfig, vocab_size: int, eos_id: int) -> nn.Module:
        return build_gpt2(model_cfg, vocab_size, eos_id)

    def loss(self, model: nn.Module, batch: Batch[torch.Tensor]) -> torch.Tensor:
        """Mean loss over the micro-batch's learned tokens (0, with no gradient, if it has none), plus a mixture of
        experts' router load-balancing loss (what transformers adds when it computes the loss itself)."""
        out = model(input_ids=batch.tokens)
        total, count = masked_loss_sum(out.logits, masked_targets(batch))
        aux = router_aux_loss(out, model)
        loss = total / count.clamp(min=1)
        return loss if aux is None else loss + aux

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch[torch.Tensor]]) -> dict[str, float]:
        """Summed loss, correct top-1 predictions and count of the learned tokens, for this rank."""
        total, correct, tokens = 0.0, 0, 0
        for batch in batches:
            targets = masked_targets(batch)
            logits = model(input_ids=batch.tokens).logits
            loss_sum, count = masked_loss_sum(logits, targets)
            total += float(loss_sum)
            correct += correct_next_tokens(logits, targets)
            tokens += int(count)
        return {"loss_sum": total, "correct": float(correct), "tokens": float(tokens)}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Loss, perplexity and next-token accuracy over the learned (reply) tokens of all ranks."""
        return lm_metrics(sums)
