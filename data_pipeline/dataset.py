"""A prepared dataset on storage: fixed-length token sequences in binary shards, described by manifest.json.

Layout (format_version 1):
    <dataset>/manifest.json        written last: kind, splits, shards (tokens, sequences, sha256), tokenizer hash
    <dataset>/tokenizer/            a transformers tokenizer folder (data_pipeline/tokenizer.py)
    <dataset>/<split>/shard_00000.bin   little-endian uint16 or uint32 tokens, seq_len per sequence
    <dataset>/<split>/shard_00000.mask  kind=chat: uint8 loss mask, one per token (1 = learn it)
                                        (chat shards hold one conversation per sequence, padded with pad_id;
                                        datasets prepared before that pack conversations end to end)
    <dataset>/<split>/shard_00000.labels  kind=classification: little-endian int32 class id per sequence

kind=preference stores one pair per example: its chosen row then its rejected row, seq_len tokens each, with a
mask over each answer's tokens (data_pipeline/preference.py). The manifest's `example_rows` (2; absent means 1)
says so: a shard's `sequences` count examples, each of example_rows * seq_len tokens, and `seq_len` stays a row's.

Every file is found through its path in the manifest, relative to the dataset's folder: an object-store
dataset keeps them under `v-<fingerprint>/` (see data_pipeline/prepare.py), a local one at the top.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from data_pipeline import storage
from data_pipeline.batch import LABELS, LOSS_MASK

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 20  # ~1M tokens a shard: small enough for cheap range reads, few enough files


class DatasetError(ValueError):
    """A dataset that is missing or malformed; the message names the URL."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


@dataclass(frozen=True)
class Shard:
    """One binary file of whole sequences, and the files of what is stored beside its tokens."""

    url: str
    sequences: int
    mask_url: str | None = None  # uint8 per token (kind=chat)
    labels_url: str | None = None  # int32 per sequence (kind=classification)


class Dataset:
    """Read access to a prepared dataset's manifest and its splits."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        manifest_url = storage.join(self.url, MANIFEST)
        try:
            self.manifest = json.loads(storage.read_text(manifest_url))
        except FileNotFoundError:
            raise DatasetError(
                f"no dataset at {self.url}: {MANIFEST} is missing (prepare one with `kiln prepare` or check data.path)"
            ) from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{manifest_url} is not valid JSON ({exc})") from None
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DatasetError(
                f"{manifest_url}: format_version {version} is not supported (this Kiln reads {FORMAT_VERSION})"
            )
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        if self.manifest.get("eos_id") is None:
            raise DatasetError(
                f"{manifest_url}: the dataset records no EOS id (an older Kiln prepared it with a tokenizer whose EOS "
                "it could not find, and ended its documents with token 0): prepare it again with `kiln prepare`"
            )
        self.eos_id: int = self.manifest["eos_id"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.example_rows: int = int(self.manifest.get("example_rows", 1))  # 2 for preference pairs

    @property
    def example_tokens(self) -> int:
        """Tokens of one stored example (the unit the stream shuffles, shards and counts): its rows of seq_len."""
        return self.seq_len * self.example_rows

    @property
    def tokenizer_url(self) -> str:
        """Folder holding tokenizer.json."""
        return storage.join(self.url, (self.manifest.get("tokenizer") or {}).get("path", "tokenizer"))

    def shards(self, split: str) -> list[Shard]:
        """The shards of a split, in order."""
        try:
            entries = self.manifest["splits"][split]["shards"]
        except KeyError:
            raise DatasetError(
                f"dataset {self.url} has no split {split!r}; it has {', '.join(self.manifest['splits'])}"
            ) from None
        return [
            Shard(
                storage.join(self.url, e["path"]),
                e["sequences"],
                mask_url=storage.join(self.url, e["mask"]["path"]) if "mask" in e else None,
                labels_url=storage.join(self.url, e["labels"]["path"]) if "labels" in e else None,
            )
            for e in entries
        ]

    @property
    def label_map(self) -> dict[str, int] | None:
        """kind=classification: label name -> class id, as `kiln prepare` made it (None for other kinds)."""
        labels = self.manifest.get("label_map")
        return None if labels is None else {str(name): int(i) for name, i in labels.items()}

    @property
    def kind(self) -> str:
        """What `kiln prepare kind=` made: pretrain, chat, classification or preference (datasets older than kinds:
        pretrain)."""
        return str(self.manifest.get("kind", "pretrain"))

    @property
    def fields(self) -> tuple[str, ...]:
        """What every shard stores besides tokens: `loss_mask` (chat, preference), `labels` (classification), or
        nothing."""
        entries = [e for split in self.manifest["splits"].values() for e in split["shards"]]
        stored = {LOSS_MASK: "mask", LABELS: "labels"}
        return tuple(f for f, key in stored.items() if entries and all(key in e for e in entries))

    def check_trainable(self) -> None:
        """Fail naming the split and the fix if train or val holds no whole sequence (training reads both)."""
        for split in ("train", "val"):
            if not sum(shard.sequences for shard in self.shards(split)):
                fix = "a larger val_fraction or more data" if split == "val" else "more data or a smaller seq_len"
                raise DatasetError(
                    f"dataset {self.url}: its {split} split holds no whole sequence of {self.seq_len} "
                    f"tokens, and training reads it; prepare it again with {fix}"
                )


class ShardWriter:
    """Packs a stream of documents into seq_len sequences (EOS between documents) and writes shards.

    With with_mask, each token also carries a 0/1 loss mask (chat: learn only the assistant's tokens),
    written beside each shard as uint8 `<shard>.mask`.
    """

    def __init__(
        self, dataset_url: str, split: str, *, seq_len: int, vocab_size: int, eos_id: int, with_mask: bool = False
    ):
        self.dataset_url, self.split = dataset_url, split
        self.seq_len, self.eos_id, self.with_mask = seq_len, eos_id, with_mask
        self.dtype = token_dtype(vocab_size)
        self.shard_sequences = max(1, SHARD_TOKENS // seq_len)
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._pending_tokens = 0
        self.entries: list[dict] = []
        self.documents = 0

    def add(self, token_ids: list[int], mask: list[int] | None = None) -> None:
        """Append one document (dropped if empty), ending it with EOS unless it ends with one; masked documents
        (chat rows) are written as given."""
        if not token_ids:
            return
        self.documents += 1
        if self.with_mask:
            self._tokens.append(np.asarray(token_ids, dtype=self.dtype))
            self._masks.append(np.asarray(mask, dtype=np.uint8))
        else:
            ends = [] if token_ids[-1] == self.eos_id else [self.eos_id]
            self._tokens.append(np.asarray([*token_ids, *ends], dtype=self.dtype))
        self._pending_tokens += len(self._tokens[-1])
        if self._pending_tokens >= self.shard_sequences * self.seq_len:
            self._flush(final=False)

    def close(self) -> dict:
        """Write what is left (dropping a last partial sequence) and return this split's manifest entry."""
        self._flush(final=True)
        return {
            "documents": self.documents,
            "sequences": sum(e["sequences"] for e in self.entries),
            "tokens": sum(e["tokens"] for e in self.entries),
            "shards": self.entries,
        }

    def _flush(self, final: bool) -> None:
        if not self._tokens:
            return
        tokens = np.concatenate(self._tokens)
        masks = np.concatenate(self._masks) if self.with_mask else None
        per_shard = self.shard_sequences * self.seq_len
        while len(tokens) >= per_shard or (final and len(tokens) >= self.seq_len):
            take = min(per_shard, len(tokens) - len(tokens) % self.seq_len)
            self._write(tokens[:take], masks[:take] if masks is not None else None)
            tokens = tokens[take:]
            masks = masks[take:] if masks is not None else None
        keep = len(tokens) and not final
        self._tokens = [tokens] if keep else []
        self._masks = [masks] if keep and masks is not None else []
        self._pending_tokens = len(tokens) if keep else 0

    def _write(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        rel = f"{self.split}/shard_{len(self.entries):05d}.bin"
        entry = write_array(self.dataset_url, rel, tokens.astype(self.dtype, copy=False))
        entry.update(tokens=len(tokens), sequences=int(len(tokens) // self.seq_len))
        if mask is not None:
            entry["mask"] = write_array(self.dataset_url, rel[:-4] + ".mask", mask)
        self.entries.append(entry)


OVERFLOW = ("truncate", "drop")  # what kind=chat does with a conversation longer than seq_len


class ChatRowWriter:
    """kind=chat: one conversation per sequence, so no conversation attends to another and no reply is stored
    without its prompt. A longer conversation is cut at seq_len (its start kept) or dropped (`overflow`); one with
    nothing left to learn is dropped. Rows are padded with pad_id, which is never learned."""

    def __init__(self, dataset_url: str, split: str, *, seq_len: int, vocab_size: int, pad_id: int, overflow: str):
        self.rows = ShardWriter(
            dataset_url, split, seq_len=seq_len, vocab_size=vocab_size, eos_id=pad_id, with_mask=True
        )
        self.seq_len, self.pad_id, self.overflow = seq_len, pad_id, overflow
        self.truncated = self.dropped = self.conversation_tokens = 0

    def add(self, token_ids: list[int], mask: list[int]) -> bool:
        """Store one conversation (cut or dropped if longer than seq_len); False if it was dropped."""
        if len(token_ids) > self.seq_len:
            if self.overflow == "drop" or not any(mask[: self.seq_len]):
                self.dropped += 1
                return False
            token_ids, mask = token_ids[: self.seq_len], mask[: self.seq_len]
            self.truncated += 1
        self.conversation_tokens += len(token_ids)
        padding = self.seq_len - len(token_ids)
        self.rows.add([*token_ids, *[self.pad_id] * padding], [*mask, *[0] * padding])
        return True

    def close(self) -> dict:
        """Write the rows and return this split's manifest entry, with what was cut, dropped and padded."""
        entry = self.rows.close()
        stored = entry["sequences"] * self.seq_len
        entry.update(
            truncated=self.truncated,
            dropped=self.dropped,
            conversation_tokens=self.conversation_tokens,
            fill=round(self.conversation_tokens / stored, 4) if stored else 0.0,
        )
        return entry


def example_row(token_ids: list[int], seq_len: int, eos_id: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
    """One classification example as stored: its first seq_len - 1 tokens, then EOS up to seq_len.

    At least one EOS always follows the text, so a row's text ends where its trailing EOS padding starts.
    `kiln prepare` (ExampleWriter) and `kiln predict` both build rows here, so a text is scored as it was trained.
    """
    row = np.full(seq_len, eos_id, dtype=dtype)
    kept = token_ids[: seq_len - 1]
    row[: len(kept)] = kept
    return row


class ExampleWriter:
    """Classification: one example per sequence (truncated, EOS-padded) with an int32 class id each."""

    def __init__(self, dataset_url: str, split: str, *, seq_len: int, vocab_size: int, eos_id: int):
        self.dataset_url, self.split, self.seq_len, self.eos_id = dataset_url, split, seq_len, eos_id
        self.dtype = token_dtype(vocab_size)
        self.per_shard = max(1, SHARD_TOKENS // seq_len)
        self._rows: list[np.ndarray] = []
        self._labels: list[int] = []
        self.entries: list[dict] = []
        self.documents = 0

    def add(self, token_ids: list[int], label: int) -> None:
        """Append one example; text past seq_len - 1 tokens is cut, the rest padded with EOS."""
        self._rows.append(example_row(token_ids, self.seq_len, self.eos_id, self.dtype))
        self._labels.append(label)
        self.documents += 1
        if len(self._rows) >= self.per_shard:
            self._write()

    def close(self) -> dict:
        """Write what is left and return this split's manifest entry."""
        self._write()
        return {
            "documents": self.documents,
            "sequences": self.documents,
            "tokens": self.documents * self.seq_len,
            "shards": self.entries,
        }

    def _write(self) -> None:
        if not self._rows:
            return
        rel = f"{self.split}/shard_{len(self.entries):05d}.bin"
        entry = write_array(self.dataset_url, rel, np.stack(self._rows))
        entry.update(tokens=len(self._rows) * self.seq_len, sequences=len(self._rows))
        entry["labels"] = write_array(self.dataset_url, rel[:-4] + ".labels", np.asarray(self._labels, dtype="<i4"))
        self.entries.append(entry)
        self._rows, self._labels = [], []


def write_array(dataset_url: str, rel: str, array: np.ndarray) -> dict:
    """Write an array's raw bytes atomically; returns its manifest entry (path and sha256)."""
    data = array.tobytes()
    storage.write_atomic(storage.join(dataset_url, rel), data)
    return {"path": rel, "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(dataset_url: str, manifest: dict) -> None:
    """Commit a dataset: the manifest is written last, so a dataset without one is unfinished."""
    body = {"format_version": FORMAT_VERSION, **manifest}
    storage.write_atomic(storage.join(dataset_url, MANIFEST), json.dumps(body, indent=2, sort_keys=True))


def open_training_data(source: str, path: str | None, mixture) -> tuple[list[Dataset], list[float]]:
    """The datasets a run trains on and their weights; a mixture must share seq_len, tokenizer, kind and label map."""
    if source != "mixture":
        return [open_dataset(path)], [1.0]
    datasets = [open_dataset(entry.path) for entry in mixture]
    first = datasets[0]
    same = "prepare every part with the same tokenizer=, seq_len= and kind="
    for other in datasets[1:]:
        for what, a, b, fix in (
            ("seq_len", first.seq_len, other.seq_len, same),
            ("tokenizer", first.manifest["tokenizer"]["sha256"], other.manifest["tokenizer"]["sha256"], same),
            ("kind", first.kind, other.kind, same),  # every batch carries the same fields (e.g. a loss mask)
            # a class id must mean one label in every part: the same set of labels gives the same map
            ("label map", first.label_map, other.label_map, "give every part's rows the same set of labels"),
        ):
            if a != b:
                raise DatasetError(
                    f"data.mixture: {other.url} has a different {what} than {first.url} ({b} vs {a}); {fix}"
                )
    return datasets, [float(entry.weight) for entry in mixture]


def open_dataset(url: str | None) -> Dataset:
    """Open a committed dataset, failing with the URL named when it is not one."""
    if not url:
        raise DatasetError("no dataset given: set data.path")
    return Dataset(url)
