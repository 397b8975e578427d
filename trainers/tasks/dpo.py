"""task=dpo: Direct Preference Optimization on `kiln prepare kind=preference` pairs, from a frozen reference.

A stored example is a pair, its chosen row then its rejected row side by side (m, 2L). `host_batch` lays a
micro-batch out as TRL does, (2m, L) rows: the m chosen rows, then the m rejected ones, with each pair's
reference log-probs (trainers/reference.py computed them once, before the first step) looked up by its index in
its split. One forward scores both answers of every pair; the loss is the mean over the pairs of
trainers/tasks/preference.py's `preference_loss` (and an MoE model's router loss, as task=sft adds it).

`train/micro_batch` and `train.global_batch` count pairs. Each step also sums, per rank, the pairs and TRL's
metrics (`train_stats`), which the step window gathers at sync steps: `train/rewards/*` and `train/logps/*` are
means over the step's pairs on every rank, as TRL's log averages them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.tokenizer import Vocabulary
from trainers.config import DpoConfig, ModelConfig
from trainers.models import router_aux_loss
from trainers.tasks.base import TaskBase
from trainers.tasks.preference import PAIR_STATS, PairScores, answer_logps, pair_sums, preference_loss

PAIRS = "pairs"


def pair_rows(batch: Batch[np.ndarray]) -> Batch[np.ndarray]:
    """(m, 2L) pairs as (2m, L) rows, TRL's order: every chosen row, then every rejected row (masks alike)."""
    if batch.loss_mask is None:
        raise ValueError("task=dpo needs preference pairs with their answers' mask (`kiln prepare kind=preference`)")
    width = batch.tokens.shape[1] // 2

    def rows(array: np.ndarray) -> np.ndarray:
        return np.concatenate([array[:, :width], array[:, width:]])

    return replace(batch, tokens=rows(batch.tokens), loss_mask=rows(batch.loss_mask))


def disable_dropout(model: nn.Module) -> nn.Module:
    """model with every dropout off (TRL's disable_dropout, and the attention dropout transformers keeps as a float):
    the policy's log-probs are then those the reference was computed with, and a resumed run draws nothing."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            setattr(module, "attention_dropout", 0.0)  # noqa: B010 (a plain float attribute, not a submodule)
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return model


class DPO(TaskBase):
    """The policy learns to prefer each pair's chosen answer over its rejected one more than the reference does."""

    train_stats: tuple[str, ...] = (PAIRS, *PAIR_STATS)

    def __init__(self, seed: int = 0, vocabulary: Vocabulary | None = None, dpo: DpoConfig | None = None):
        super().__init__(seed, vocabulary)
        self.settings = dpo or DpoConfig()
        self.reference: dict[str, np.ndarray] | None = None  # split -> (pairs, 2) float32: chosen, rejected

    def build_model(self, model_cfg: ModelConfig, vocab_size: int, eos_id: int) -> nn.Module:
        raise ValueError("task=dpo starts from model.init_from: the reference model is the model training starts from")

    def attach_reference(self, tables: dict[str, np.ndarray]) -> None:
        """The reference log-probs of every pair of each split, by index (trainers/reference.py)."""
        self.reference = tables

    def host_batch(self, batch: Batch[np.ndarray], split: str) -> Batch[np.ndarray]:
        """The pairs as rows, each with its reference log-probs."""
        if self.reference is None or batch.indices is None:
            raise RuntimeError("task=dpo read a batch before the reference log-probs of its pairs were attached")
        return replace(pair_rows(batch), reference=self.reference[split][batch.indices])

    def answer_logps(self, model: nn.Module, batch: Batch[torch.Tensor]):
        """(chosen, rejected) summed answer log-probs of each pair (fp32), and the model's output."""
        assert batch.loss_mask is not None  # pair_rows checked it
        out = model(input_ids=batch.tokens)
        chosen, rejected = answer_logps(out.logits, batch.tokens, batch.loss_mask).chunk(2)
        return chosen, rejected, out

    def scores(self, model: nn.Module, batch: Batch[torch.Tensor]):
        """Each pair's loss and rewards, its policy log-probs, and the model's output."""
        chosen, rejected, out = self.answer_logps(model, batch)
        assert batch.loss_mask is not None and batch.reference is not None
        tokens_chosen, tokens_rejected = batch.loss_mask.sum(dim=1).chunk(2)  # TRL's unshifted answer lengths
        settings = self.settings
        scores: PairScores = preference_loss(
            chosen,
            rejected,
            batch.reference[:, 0],
            batch.reference[:, 1],
            tokens_chosen,
            tokens_rejected,
            loss=settings.loss,
            beta=settings.beta,
            label_smoothing=settings.label_smoothing,
        )
        return scores, chosen, rejected, out

    def loss_and_stats(self, model: nn.Module, batch: Batch[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean loss over the micro-batch's pairs (plus an MoE router's), and its pairs and PAIR_STATS summed."""
        scores, chosen, rejected, out = self.scores(model, batch)
        loss = scores.losses.mean()
        aux = router_aux_loss(out, model)
        pairs = torch.full((1,), float(len(chosen)), dtype=torch.float64, device=chosen.device)
        stats = torch.cat([pairs, pair_sums(scores, chosen, rejected)])
        return (loss if aux is None else loss + aux), stats

    def loss(self, model: nn.Module, batch: Batch[torch.Tensor]) -> torch.Tensor:
        return self.loss_and_stats(model, batch)[0]

    def train_metrics(self, sums: list[float]) -> dict[str, float]:
        """train/rewards/* and train/logps/*: means over the step's pairs."""
        pairs, *stats = sums
        return {f"train/{name}": value / pairs for name, value in zip(PAIR_STATS, stats, strict=True)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch[torch.Tensor]]) -> dict[str, float]:
        """This rank's summed pair losses, pairs and PAIR_STATS."""
        sums = dict.fromkeys(("loss_sum", PAIRS, *PAIR_STATS), 0.0)
        for batch in batches:
            scores, chosen, rejected, _ = self.scores(model, batch)
            sums["loss_sum"] += float(scores.losses.double().sum())
            sums[PAIRS] += len(chosen)
            for name, value in zip(PAIR_STATS, pair_sums(scores, chosen, rejected).tolist(), strict=True):
                sums[name] += value
        return sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """val/loss, val/rewards/* and val/logps/*: means over every rank's pairs."""
        pairs = sums[PAIRS]
        return {"val/loss": sums["loss_sum"] / pairs, **{f"val/{name}": sums[name] / pairs for name in PAIR_STATS}}
