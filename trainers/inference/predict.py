"""`kiln predict`: a classifier's label and class probabilities for each text, in one CPU process.

A text becomes the row `kiln prepare kind=classification` would have stored for it (the same tokenizer, the
same `example_row`: cut to seq_len - 1 tokens, EOS-padded) and is scored by the classification task's own
forward pass, so a prediction is what the run's evaluation computed for that example.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from data_pipeline.dataset import example_row
from trainers.inference.loaded_model import InferenceError, LoadedModel
from trainers.tasks.classification import Classification


@dataclass(frozen=True)
class Prediction:
    """One text's most likely label and every class's probability (in class-id order)."""

    text: str
    label: str
    probabilities: dict[str, float]

    def as_json(self) -> dict:
        """The JSON object `kiln predict --json` writes for it."""
        return {"text": self.text, "label": self.label, "probabilities": self.probabilities}


def classifier(loaded: LoadedModel) -> Classification:
    """The classification task of a loaded model, or InferenceError if it is not a classifier."""
    if loaded.task.name != "classification":
        raise InferenceError(
            f"{loaded.name} is a task={loaded.task.name} model, not a classifier: kiln predict needs a "
            "task=classification run or an exported *ForSequenceClassification folder"
        )
    task = loaded.build_task()
    assert isinstance(task, Classification)
    return task


def predict(loaded: LoadedModel, texts: Iterable[str], seq_len: int) -> Iterator[Prediction]:
    """Each text's prediction, one at a time (stdin lines are answered as they come).

    seq_len is the row length the model was trained on: a run's data.seq_len (a folder: its context).
    """
    task = classifier(loaded)
    if seq_len < 2:
        raise InferenceError(f"the sequence length must be >= 2 (a token and its EOS), got {seq_len}")
    for number, text in enumerate(texts, 1):
        if not text.strip():  # `kiln prepare` refuses such a row too: there is nothing to classify
            raise InferenceError(f"text {number} is empty: give each text some words")
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # as `kiln prepare` encodes a text
        row = torch.from_numpy(example_row(ids, seq_len, loaded.eos_id))[None]
        with torch.no_grad():
            probabilities = torch.softmax(task.logits(loaded.model, row)[0], dim=-1).tolist()
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        yield Prediction(text, task.labels[best], dict(zip(task.labels, probabilities, strict=True)))
