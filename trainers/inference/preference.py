"""`kiln eval RUN --data PAIRS.jsonl` of a task=dpo run: reward accuracy and margins on any preference file.

The file is read as `kiln prepare` reads its input (data_pipeline/sources.py: JSON Lines, Parquet, CSV, a
`datasets` folder) and each record encoded as `kiln prepare kind=preference` encodes it, with the run's tokenizer
and cut at the run's data.seq_len (`encode_preference`, `fit_pair`, `stored_example`). The pairs are then scored as
the run's own validation pairs are (task=dpo's `evaluate` and `summarize`): the policy is the run's checkpoint and
the reference its initial model (the same model with its LoRA adapters off, or the run's init_model folder),
scored here in this process instead of read from the run's committed table, which covers the run's own pairs only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from data_pipeline import storage
from data_pipeline.batch import Batch
from data_pipeline.examples import ExampleError
from data_pipeline.preference import IdenticalAnswers, PreferencePair, encode_preference, fit_pair, stored_example
from data_pipeline.sources import Record, SourceError, detect_format, expand, read_records
from trainers.config import ModelConfig
from trainers.inference.loaded_model import CPU, InferenceError, LoadedModel
from trainers.lora import adapters_off, is_lora
from trainers.tasks.base import on_device
from trainers.tasks.dpo import DPO, pair_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_LISTED_BAD = 20  # bad records named one by one, as `kiln prepare` lists them
ANSWERS = ("chosen", "rejected")  # the keys that make a file's records preference pairs


@dataclass
class PreferenceFile:
    """A file's pairs, encoded and cut for the run, and what became of its other records."""

    pairs: list[PreferencePair] = field(default_factory=list)
    bad_records: int = 0
    bad_examples: list[str] = field(default_factory=list)  # the first MAX_LISTED_BAD, as file:line: reason
    truncated: int = 0  # pairs kept with an answer cut at seq_len
    dropped: int = 0  # pairs whose prompt fills seq_len (TRL leaves them out too)
    identical: int = 0  # pairs whose answers are the same once cut (no preference left to score)

    def counts(self) -> dict[str, int]:
        """What the file held besides its pairs, by name (as `kiln eval` reports them)."""
        return {
            "pairs": len(self.pairs),
            "bad_records": self.bad_records,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "identical": self.identical,
        }


def records_input(url: str) -> bool:
    """Whether url is read as records (a file, or a `datasets` save_to_disk folder) rather than a prepared dataset."""
    fs, path = storage.filesystem(url)
    try:
        if not fs.isdir(path):
            return url.endswith(".jsonl") or fs.isfile(path)
        return fs.exists(storage.join(path, "state.json"))
    except (OSError, ValueError):
        return False


def records(url: str) -> Iterator[Record]:
    """Every record of the file(s) at url, whole rows, read as `kiln prepare` reads them (SourceError if it cannot)."""
    for file in expand(url):
        yield from read_records(file, detect_format(file, "auto"), None)


def holds_preference_pairs(url: str) -> bool:
    """Whether the first good record at url has `chosen` or `rejected` (then a record lacking the other is a bad pair);
    False when url cannot be read as records: the prompt/reference reader then says what is wrong with it."""
    try:
        for record in records(url):
            if record.error is None and record.row is not None:
                return any(key in record.row for key in ANSWERS)
    except (SourceError, OSError):
        return False
    return False


def read_preferences(url: str, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> PreferenceFile:
    """The pairs at url encoded with tokenizer and cut to seq_len, exactly as `kiln prepare kind=preference` stores
    them (overflow=truncate); bad records counted and listed. InferenceError (one line) for a pair whose answers are
    identical, which prepare refuses too, or a file without a usable pair."""
    read = PreferenceFile()
    try:
        for record in records(url):
            pair = encoded(tokenizer, record, read)
            if pair is None:
                continue
            fitted = fit_pair(pair, seq_len)
            read.truncated += fitted.outcome == "truncated"
            read.dropped += fitted.outcome == "dropped"
            read.identical += fitted.outcome == "identical"
            if fitted.pair is not None:
                read.pairs.append(fitted.pair)
    except SourceError as exc:
        raise InferenceError(str(exc)) from None
    if not read.pairs:
        first = f"; first: {read.bad_examples[0]}" if read.bad_examples else ""
        raise InferenceError(
            f"{url} holds no usable preference pair ({read.bad_records} bad records, {read.dropped} whose prompt "
            f"fills seq_len={seq_len}, {read.identical} identical once cut){first}"
        )
    return read


def encoded(tokenizer: PreTrainedTokenizerBase, record: Record, read: PreferenceFile) -> PreferencePair | None:
    """One record's pair, or None when it is bad (counted in read and listed, with its file and line)."""
    where = f"{record.source}:{record.line}"
    error = record.error
    if error is None and record.row is not None:
        try:  # as prepare carries a record to its tokenizer: the row as JSON
            return encode_preference(tokenizer, json.loads(json.dumps(record.row, default=str)))
        except IdenticalAnswers as exc:  # refused whatever else the file holds: skipping it is no fix
            raise InferenceError(f"{where}: {exc}") from None
        except ExampleError as exc:
            error = f"{where}: {exc}"
    read.bad_records += 1
    if len(read.bad_examples) < MAX_LISTED_BAD:
        read.bad_examples.append(str(error))
    return None


def pair_batches(pairs: list[PreferencePair], seq_len: int, pad_id: int, micro_batch: int) -> list[Batch[np.ndarray]]:
    """The pairs as the stream reads stored pairs (tokens and mask (m, 2 seq_len)), micro_batch pairs a batch."""
    batches: list[Batch[np.ndarray]] = []
    for start in range(0, len(pairs), micro_batch):
        examples = [stored_example(pair, seq_len, pad_id) for pair in pairs[start : start + micro_batch]]
        tokens = np.array([tokens for tokens, _ in examples], dtype=np.int64)
        batches.append(Batch(tokens, loss_mask=np.array([mask for _, mask in examples], dtype=np.uint8)))
    return batches


@torch.no_grad()
def preference_metrics(
    task: DPO, policy: nn.Module, reference: nn.Module, batches: list[Batch[np.ndarray]]
) -> dict[str, float]:
    """loss, rewards/* and logps/* (means over the pairs, with the task's dpo settings) of the policy against the
    reference, in eval mode, without gradients, in fp32 on CPU. reference may be the policy itself when it carries
    LoRA adapters: they are off while it scores the reference log-probs."""
    policy.eval()
    reference.eval()
    rows = [on_device(pair_rows(batch), CPU) for batch in batches]
    scored = []
    with adapters_off(reference):  # each pair's (chosen, rejected) fp32 log-probs, as the run's committed table
        for batch in rows:
            chosen, rejected, _ = task.answer_logps(reference, batch)
            scored.append(replace(batch, reference=torch.stack([chosen, rejected], dim=1)))
    metrics = task.summarize(task.evaluate(policy, scored))
    return {name.removeprefix("val/"): value for name, value in metrics.items()}


def initial_model(loaded: LoadedModel, model_cfg: ModelConfig) -> nn.Module:
    """The model a task=dpo run started from (its reference): the loaded model itself when it carries LoRA adapters
    (unmerged; preference_metrics turns them off), else the run's model.init_from folder (its init_model copy),
    built as the run built it (fp32, dropout off)."""
    from trainers.tasks import build_model

    if is_lora(loaded.model):
        return loaded.model
    model = build_model(loaded.build_task(), model_cfg, len(loaded.tokenizer), loaded.eos_id)
    return model.eval()
