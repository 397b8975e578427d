"""Masked language modelling (BERT-style): hide 15% of the tokens and predict them from both sides.

Masks are dynamic (drawn afresh for every batch) but not stateful: each row's randomness is seeded from
(train.seed, the split, the row's global stream position), so a run resumed at any world size masks each
sequence exactly as the uninterrupted run did, and every evaluation of the same validation rows (in the
run, or `kiln eval` later) uses the same masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.tokenizer import MASK_TOKEN
from trainers.config import ModelConfig
from trainers.models import build_masked_lm
from trainers.tasks.base import IGNORE_INDEX, TaskBase
from trainers.tasks.causal_lm import lm_metrics

MASK_RATE = 0.15  # of the non-special tokens, chosen to predict (BERT's rate) ...
MASKED, REPLACED = 0.8, 0.1  # ... of which 80% read the mask token, 10% a random token, 10% themselves
SALT = 0x6D6C6D  # keeps these draws apart from any other use of (seed, position)
SPLITS = {"train": 0, "val": 1}


def mlm_mask(
    tokens: np.ndarray,
    *,
    seed: int,
    split: str,
    positions: np.ndarray,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a batch of rows (rows, seq_len): each non-special token chosen with probability 0.15;
    a chosen token reads mask_id (80%), a random non-special token (10%) or itself (10%), and is its own label;
    labels are IGNORE_INDEX elsewhere.

    Row i's draws depend only on (seed, split, positions[i]) and have a fixed shape whatever the tokens, so a
    row masks the same in any batch, on any rank, at any world size.
    """
    specials = np.asarray(sorted(special_ids), dtype=np.int64)
    real = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), specials)
    inputs, labels = tokens.astype(np.int64, copy=True), np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    for row, position in enumerate(np.asarray(positions).tolist()):
        rng = np.random.Generator(np.random.PCG64([seed, SALT, SPLITS[split], int(position)]))
        choose, action = rng.random(tokens.shape[1]), rng.random(tokens.shape[1])
        random_tokens = real[rng.integers(0, len(real), tokens.shape[1])]
        chosen = (choose < MASK_RATE) & ~np.isin(tokens[row], specials)
        labels[row, chosen] = tokens[row, chosen]
        inputs[row, chosen & (action < MASKED)] = mask_id
        swapped = chosen & (action >= MASKED) & (action < MASKED + REPLACED)
        inputs[row, swapped] = random_tokens[swapped]
    return inputs, labels


class MaskedLM(TaskBase):
    """BERT-style masked-LM pretraining on packed sequences (masks seeded by train.seed)."""

    def build_model(self, model_cfg: ModelConfig, vocab_size: int, eos_id: int) -> nn.Module:
        return build_masked_lm(model_cfg, vocab_size, eos_id)

    def host_batch(self, batch: Batch[np.ndarray], split: str) -> Batch[np.ndarray]:
        """The batch masked by mlm_mask: inputs as tokens, each chosen token's id as its label (IGNORE_INDEX elsewhere).

        Done on the host, where the stream's arrays are, so a GPU never waits on a copy back to draw masks.
        """
        vocabulary = self.vocabulary
        if vocabulary is None or vocabulary.mask_id is None:
            raise ValueError(f"task=mlm needs the tokenizer's {MASK_TOKEN} token (data prepared by `kiln prepare`)")
        if batch.positions is None:
            raise ValueError("task=mlm needs each row's stream position (batches from a TokenStream)")
        inputs, labels = mlm_mask(
            batch.tokens,
            seed=self.seed,
            split=split,
            positions=batch.positions,
            mask_id=vocabulary.mask_id,
            vocab_size=vocabulary.size,
            special_ids=vocabulary.specials,
        )
        return Batch(inputs, labels=labels, positions=batch.positions)

    def loss(self, model: nn.Module, batch: Batch[torch.Tensor]) -> torch.Tensor:
        """Mean cross entropy over the micro-batch's chosen tokens."""
        # No attention mask: packed pretraining sequences hold no padding, so every position attends to all.
        total, count = masked_loss_sum(model(input_ids=batch.tokens).logits, chosen(batch))
        return total / count.clamp(min=1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch[torch.Tensor]]) -> dict[str, float]:
        """Summed loss, correct top-1 predictions and count of the chosen tokens, for this rank."""
        total, correct, tokens = 0.0, 0, 0
        for batch in batches:  # masked with split="val": the same masks at every evaluation of these rows
            labels = chosen(batch)
            logits = model(input_ids=batch.tokens).logits
            loss_sum, count = masked_loss_sum(logits, labels)
            total += float(loss_sum)
            correct += int(((logits.argmax(dim=-1) == labels) & (labels != IGNORE_INDEX)).sum())
            tokens += int(count)
        return {"loss_sum": total, "correct": float(correct), "tokens": float(tokens)}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Loss, perplexity and top-1 accuracy over the masked tokens of all ranks (accuracy as val/mlm_accuracy)."""
        metrics = lm_metrics(sums)
        metrics["val/mlm_accuracy"] = metrics.pop("val/accuracy")
        return metrics


def chosen(batch: Batch[torch.Tensor]) -> torch.Tensor:
    """The masked batch's targets (its labels); a batch that skipped host_batch has none."""
    if batch.labels is None:
        raise ValueError("task=mlm reads batches masked by its host_batch (labels per token)")
    return batch.labels


def masked_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross entropy over the chosen tokens, how many there are); no shift: a position predicts itself."""
    wanted = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), wanted, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (wanted != IGNORE_INDEX).sum()
