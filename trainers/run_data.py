"""The prepared data a run trains on, checked once: the facts its workers build the task and model from.

The driver resolves them while it plans the run (orchestrator/run/plan.py) and hands them to every worker,
so a worker opens the data only to read batches; a caller that starts the loop without a driver's plan
(a test, a notebook) gets the same checks from `check_run_data`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from data_pipeline import tokenizer as bpe
from data_pipeline.config import DataConfig
from data_pipeline.dataset import DatasetError, open_training_data
from trainers.task_data import check_task_data, run_labels


@dataclass(frozen=True)
class RunData:
    """What the run's prepared data is, as checked against its config."""

    url: str  # the dataset (a mixture's first part, whose tokenizer is every part's)
    tokenizer_url: str
    vocab_size: int  # the manifest's: the token ids the shards hold
    eos_id: int
    seq_len: int
    vocabulary: bpe.Vocabulary  # the tokenizer's size and special ids, which the task draws on
    labels: tuple[str, ...] | None  # task=classification: the data's classes
    example_rows: int = 1  # rows of seq_len tokens a stored example holds: 2 for preference pairs


def check_run_data(
    data: DataConfig,
    task: str,
    labels: Sequence[str] | None,
    model_vocab_size: int | None,
    log: Callable[[str], None],
) -> RunData:
    """Open data.path (or data.mixture) and check it fits the run: whole train and val splits, seq_len,
    vocabulary, and what the task needs; DatasetError naming the fix otherwise."""
    datasets, _ = open_training_data(data.source, data.path, data.mixture)
    for part in datasets:
        part.check_trainable()  # an empty split (a dataset prepared before prepare refused one) fails here
    dataset = datasets[0]
    if dataset.seq_len != data.seq_len:
        raise DatasetError(
            f"data.seq_len={data.seq_len} but the dataset at {data.path} was prepared "
            f"with seq_len={dataset.seq_len}; set data.seq_len={dataset.seq_len}"
        )
    if model_vocab_size is not None and model_vocab_size < dataset.vocab_size:
        raise DatasetError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({dataset.vocab_size}) of {data.path}; raise it or leave it unset"
        )
    check_task_data(task, datasets, log)  # e.g. task=sft on data without a loss mask
    classes = tuple(run_labels(labels, datasets)) if task == "classification" else None
    return RunData(
        url=dataset.url,
        tokenizer_url=dataset.tokenizer_url,
        vocab_size=dataset.vocab_size,
        eos_id=dataset.eos_id,
        seq_len=dataset.seq_len,
        vocabulary=bpe.vocabulary(bpe.load(dataset.tokenizer_url)),
        labels=classes,
        example_rows=dataset.example_rows,
    )
