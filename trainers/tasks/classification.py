"""Sequence classification: one label per example, scored by loss, accuracy and macro F1.

`kiln prepare kind=classification` stores each example as one row: its text's tokens (at most seq_len - 1),
then EOS padding to seq_len, so at least one EOS always follows the text (data_pipeline/dataset.py
example_row). The text is every position up to its last non-EOS token (`text_mask`); the model sees it
through an attention mask:
- an encoder (BERT) attends over the text only, and classifies from its first position's pooled output;
- a decoder (GPT-2) has `pad_token_id = EOS` and scores the rightmost non-EOS token, which is the text's
  real last token (the text never ends with EOS: `kiln prepare` adds none, the padding follows it). Being
  last, it has attended to the whole text, even to an EOS written inside it, which `text_mask` keeps too.
A Hugging Face user who feeds the unpadded text gets the same logits, so an exported model agrees.

The loss is our own cross entropy on the logits: transformers' built-in loss switches to regression when
num_labels == 1 and guesses a problem type from the label dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.tokenizer import Vocabulary
from trainers.config import ModelConfig
from trainers.tasks.base import TaskBase

AUTO_CLASS = "AutoModelForSequenceClassification"


def text_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """1 on each row's text (up to its last non-pad token), 0 on the padding after it; int64 like tokenizers'."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    last = (positions * (tokens != pad_id)).argmax(dim=-1, keepdim=True)  # 0 for an all-pad row: never empty
    return (positions <= last).long()


def label_config(labels: Sequence[str]) -> dict:
    """The transformers config fields that carry the classes (exported as id2label/label2id in config.json)."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def class_counts(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> dict[str, float]:
    """Per-class true positives, false positives and false negatives, as summable statistics."""
    sums: dict[str, float] = {}
    for c in range(classes):
        hit, said = truth == c, predicted == c
        sums[f"tp/{c}"] = float((hit & said).sum())
        sums[f"fp/{c}"] = float((said & ~hit).sum())
        sums[f"fn/{c}"] = float((hit & ~said).sum())
    return sums


def f1_macro(sums: dict[str, float], classes: int) -> float:
    """Mean F1 over the classes present in the truth or the predictions, as sklearn's f1_score(average="macro").

    F1 = 2tp / (2tp + fp + fn); a class never seen in either has no F1 and is left out (sklearn's labels are
    those of y_true and y_pred); a class in only one of them has F1 0.
    """
    scores = []
    for c in range(classes):
        tp, fp, fn = sums[f"tp/{c}"], sums[f"fp/{c}"], sums[f"fn/{c}"]
        if tp + fp + fn > 0:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


class Classification(TaskBase):
    """One label per sequence, from an encoder's pooled first position or a decoder's last text token."""

    def __init__(self, labels: Sequence[str], pad_id: int, seed: int = 0, vocabulary: Vocabulary | None = None):
        super().__init__(seed, vocabulary)
        if not labels:
            raise ValueError("task=classification needs its classes (task.labels, from the data's label map)")
        self.labels, self.pad_id = list(labels), pad_id

    def build_model(self, model_cfg: ModelConfig, vocab_size: int, eos_id: int) -> nn.Module:
        from trainers.models import build_from_config

        model = build_from_config(AUTO_CLASS, model_cfg, vocab_size, eos_id, **label_config(self.labels))
        model.config.pad_token_id = eos_id  # the decoder finds the text's last token by it (see module doc)
        return model

    def logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Class scores (rows, classes) of stored example rows, in fp32."""
        return model(input_ids=tokens, attention_mask=text_mask(tokens, self.pad_id)).logits.float()

    def loss(self, model: nn.Module, batch: Batch[torch.Tensor]) -> torch.Tensor:
        """Mean cross entropy over the micro-batch's examples."""
        return F.cross_entropy(self.logits(model, batch.tokens), self.targets(batch))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch[torch.Tensor]]) -> dict[str, float]:
        """Summed loss, correct predictions, example count and per-class tp/fp/fn for this rank."""
        sums = {key: 0.0 for key in ("loss_sum", "correct", "examples")}
        sums.update({f"{kind}/{c}": 0.0 for kind in ("tp", "fp", "fn") for c in range(len(self.labels))})
        for batch in batches:
            truth = self.targets(batch)
            logits = self.logits(model, batch.tokens)
            predicted = logits.argmax(dim=-1)
            sums["loss_sum"] += float(F.cross_entropy(logits, truth, reduction="sum"))
            sums["correct"] += float((predicted == truth).sum())
            sums["examples"] += truth.numel()
            for key, value in class_counts(predicted, truth, len(self.labels)).items():
                sums[key] += value
        return sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Example-weighted loss and accuracy, and macro F1 from the per-class counts of all ranks."""
        examples = max(sums["examples"], 1.0)
        return {
            "val/loss": sums["loss_sum"] / examples,
            "val/accuracy": sums["correct"] / examples,
            "val/f1_macro": f1_macro(sums, len(self.labels)),
        }

    def targets(self, batch: Batch[torch.Tensor]) -> torch.Tensor:
        """The batch's class ids."""
        if batch.labels is None:
            raise ValueError(
                "task=classification needs batches with labels (data prepared with `kiln prepare kind=classification`)"
            )
        return batch.labels.long()
