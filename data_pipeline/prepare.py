"""`kiln prepare`: raw files -> tokenized, packed, checksummed shards with a manifest, via Ray Data.

Reading and tokenizing run as a Ray Data pipeline over the cluster's CPUs (`flat_map` over input
files, `map_batches` with the tokenizer). The driver consumes the tokenized documents in input order
and packs them into fixed-length sequences, so the output is the same whatever the parallelism.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

from data_pipeline import storage, tokenizer as bpe
from data_pipeline.dataset import MANIFEST, ExampleWriter, ShardWriter, token_dtype, write_manifest
from data_pipeline.examples import (CHAT_SPECIAL_TOKENS, ExampleError, chat_messages, classification_example,
                                    encode_chat, label_map)
from data_pipeline.sources import FORMATS, detect_format, expand, read_records

KINDS = ("pretrain", "chat", "classification")
MAX_REPORTED_BAD = 20


class PrepareError(ValueError):
    """Bad input to `kiln prepare` that stops it; the message names the file, line or setting."""


@dataclass
class PrepareConfig:
    """Settings of `kiln prepare` (passed as key=value overrides)."""

    input: str = "???"
    output: str = "???"
    format: str = "auto"
    text_field: str = "text"
    tokenizer: str = "train"  # "train", or a folder holding tokenizer.json
    vocab_size: int = 8192
    seq_len: int = 1024
    val_fraction: float = 0.01
    on_bad_record: str = "skip"
    kind: str = "pretrain"
    batch_size: int = 256  # documents per tokenizer call

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            if getattr(self, name) in ("???", "", None):
                raise PrepareError(f"{name}= is required, e.g. kiln prepare input='data/*.jsonl' output=prepared/")
        if self.format not in ("auto", *FORMATS):
            raise PrepareError(f"format must be one of auto, {', '.join(FORMATS)}; got {self.format!r}")
        if self.on_bad_record not in ("skip", "fail"):
            raise PrepareError(f"on_bad_record must be skip or fail; got {self.on_bad_record!r}")
        if self.kind not in KINDS:
            raise PrepareError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.seq_len < 8:
            raise PrepareError(f"seq_len must be >= 8, got {self.seq_len}")
        if not 256 < self.vocab_size <= 2**20:
            raise PrepareError(f"vocab_size must be in (256, 1048576], got {self.vocab_size}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise PrepareError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.batch_size < 1:
            raise PrepareError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class PrepareSummary:
    """What a preparation did (printed at the end, and kept in the manifest)."""

    output: str
    reused: bool
    documents: int = 0
    tokens: int = 0
    bad_records: int = 0
    empty_documents: int = 0
    shards: int = 0
    wall_s: float = 0.0
    bad_examples: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Throughput over the whole preparation."""
        return self.tokens / self.wall_s if self.wall_s else 0.0


def split_of(text: str, val_fraction: float) -> str:
    """train or val, by a hash of the document's text: stable across runs, machines and file order."""
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def fingerprint(files: list[str], cfg: PrepareConfig, tokenizer_sha: Optional[str]) -> str:
    """Hash of the inputs (names, sizes, modification stamps), the settings and the tokenizer."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output", "batch_size")}
    h.update(json.dumps({"settings": settings, "tokenizer": tokenizer_sha, "format": 1}, sort_keys=True).encode())
    for url in files:
        fs, path = storage.filesystem(url)
        info = fs.info(path) if not fs.isdir(path) else {"size": 0}
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
        h.update(f"{url}\0{info.get('size')}\0{stamp}\n".encode())
        if fs.isdir(path):  # a datasets folder: its files' stamps
            for rel, size in storage.walk_files(url):
                h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()[:20]


def _records_of(row: dict, text_field: str, kind: str) -> list[dict]:
    # "" rather than None for "no error": an all-None column would come back from Arrow as NaN.
    # Chat and classification rows travel whole (as JSON text) to the tokenizing step.
    records = read_records(row["url"], row["format"], text_field if kind == "pretrain" else None)
    return [{"text": json.dumps(r.row, default=str) if r.row is not None else r.text, "source": r.source,
             "line": r.line, "error": r.error or ""} for r in records]


def example_text(kind: str, text: str, text_field: str) -> str:
    """What the tokenizer is trained on for one record: the document, conversation or labelled text."""
    if kind == "pretrain":
        return text
    row = json.loads(text)
    if kind == "chat":
        return "\n".join(m["content"] for m in chat_messages(row))
    return classification_example(row, text_field)[0]


_TOKENIZERS: dict = {}


def tokenize_batch(batch: dict, tokenizer_url: str, val_fraction: float, kind: str, text_field: str,
                   labels: Optional[dict] = None) -> dict:
    """Ray Data UDF: token ids (and chat mask or class id), split and status of a batch of records."""
    tokenizer = _TOKENIZERS.get(tokenizer_url)
    if tokenizer is None:  # once per worker process, read from storage
        tokenizer = _TOKENIZERS[tokenizer_url] = bpe.load(tokenizer_url)
    texts = [str(t) for t in batch["text"]]
    out: dict[str, list] = {"ids": [], "mask": [], "label": [], "error": [], "empty": [],
                            "split": [split_of(t, val_fraction) for t in texts]}
    for text, error, source, line in zip(texts, batch["error"], batch["source"], batch["line"]):
        ids, mask, label = [], [], -1
        if not error and text.strip():
            try:
                if kind == "chat":
                    ids, mask = encode_chat(tokenizer, json.loads(text))
                elif kind == "classification":
                    sample, name = classification_example(json.loads(text), text_field)
                    ids, label = tokenizer.encode(sample).ids, labels[name]
                else:
                    ids = tokenizer.encode(text).ids
            except ExampleError as exc:
                error = f"{source}:{line}: {exc}"
        out["ids"].append(ids)
        out["mask"].append(mask)
        out["label"].append(label)
        out["error"].append(str(error) if error else "")
        out["empty"].append(not error and not text.strip())
    return out


def prepare(cfg: PrepareConfig, log: Callable[[str], None] = print,
            progress: Optional[Callable[[int, int], None]] = None) -> PrepareSummary:
    """Prepare cfg.input into cfg.output (or reuse it when nothing changed); returns the summary."""
    started = time.perf_counter()
    files = expand(cfg.input)
    formats = [detect_format(url, cfg.format) for url in files]
    given_tokenizer = None if cfg.tokenizer == "train" else bpe.load(_tokenizer_folder(cfg.tokenizer))
    given_sha = hashlib.sha256(given_tokenizer.to_str().encode()).hexdigest() if given_tokenizer else None
    key = fingerprint(files, cfg, given_sha)
    manifest_url = storage.join(cfg.output, MANIFEST)
    if storage.exists(manifest_url):
        existing = json.loads(storage.read_text(manifest_url))
        if existing.get("source", {}).get("fingerprint") == key:
            log(f"prepare: inputs, settings and tokenizer unchanged: reusing {cfg.output}")
            return PrepareSummary(cfg.output, True, **existing["summary"])
        log(f"prepare: {cfg.output} was prepared from other inputs or settings: preparing it again")
        storage.remove(manifest_url)  # uncommit the old output before its shards are replaced
    ray_dataset = _read(files, formats, cfg)
    tokenizer = given_tokenizer or _train_tokenizer(ray_dataset, cfg, log)
    tokenizer_sha = bpe.save(tokenizer, storage.join(cfg.output, "tokenizer"))
    labels = _label_map(ray_dataset, cfg) if cfg.kind == "classification" else None
    summary = _tokenize_and_pack(ray_dataset, tokenizer, storage.join(cfg.output, "tokenizer"), cfg, progress,
                                 labels)
    summary.wall_s = time.perf_counter() - started
    extra: dict = {}
    if labels is not None:
        extra["label_map"] = labels
        storage.write_atomic(storage.join(cfg.output, "label_map.json"), json.dumps(labels, indent=2))
    if cfg.kind == "chat":
        extra["chat_template"] = {"roles": {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"},
                                  "format": "{role_token}\\n{content}\\n per message, then EOS",
                                  "mask": "<shard>.mask: uint8 per token, 1 = loss on this token (assistant + EOS)"}
    write_manifest(cfg.output, {**extra,
        "kind": cfg.kind, "seq_len": cfg.seq_len, "vocab_size": tokenizer.get_vocab_size(),
        "eos_id": tokenizer.token_to_id(bpe.EOS_TOKEN), "dtype": token_dtype(tokenizer.get_vocab_size()).str,
        "tokenizer": {"path": "tokenizer", "sha256": tokenizer_sha, "trained": given_tokenizer is None},
        "source": {"input": cfg.input, "files": len(files), "formats": sorted(set(formats)),
                   "fingerprint": key, "text_field": cfg.text_field},
        "split": {"method": "sha256(document text)", "val_fraction": cfg.val_fraction},
        "splits": summary.splits,
        "summary": {k: v for k, v in asdict(summary).items() if k not in ("output", "reused", "splits")},
    })
    return summary


def _tokenizer_folder(path: str) -> str:
    if not storage.exists(storage.join(path, bpe.TOKENIZER_FILE)):
        raise PrepareError(f"tokenizer={path}: no {bpe.TOKENIZER_FILE} there; give a folder holding one, "
                           "or tokenizer=train")
    return path


def _read(files: list[str], formats: list[str], cfg: PrepareConfig):
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # our own progress line says enough
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same output whatever the parallelism
    context.enable_progress_bars = False
    items = [{"url": u, "format": f} for u, f in zip(files, formats)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return dataset.flat_map(_records_of, fn_kwargs={"text_field": cfg.text_field, "kind": cfg.kind}).materialize()


def _usable_rows(dataset, cfg: PrepareConfig) -> Iterator[str]:
    for row in dataset.iter_rows():
        if not row["error"] and row["text"].strip():
            yield row["text"]


def _train_tokenizer(dataset, cfg: PrepareConfig, log: Callable[[str], None]):
    def train_texts() -> Iterator[str]:
        for text in _usable_rows(dataset, cfg):
            if split_of(text, cfg.val_fraction) == "train":
                try:
                    yield example_text(cfg.kind, text, cfg.text_field)
                except ExampleError:
                    continue  # reported when the record is tokenized

    log(f"prepare: training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on the train split")
    special = CHAT_SPECIAL_TOKENS if cfg.kind == "chat" else []
    return bpe.train_bpe(train_texts(), cfg.vocab_size, special_tokens=special)


def _label_map(dataset, cfg: PrepareConfig) -> dict[str, int]:
    names = set()
    for text in _usable_rows(dataset, cfg):
        try:
            names.add(classification_example(json.loads(text), cfg.text_field)[1])
        except ExampleError:
            continue
    if not names:
        raise PrepareError(f"kind=classification found no rows with '{cfg.text_field}' and 'label' in {cfg.input}")
    return label_map(names)


def _tokenize_and_pack(dataset, tokenizer, tokenizer_url: str, cfg: PrepareConfig, progress,
                       labels: Optional[dict]) -> PrepareSummary:
    tokenized = dataset.map_batches(
        tokenize_batch, fn_kwargs={"tokenizer_url": tokenizer_url, "val_fraction": cfg.val_fraction,
                                   "kind": cfg.kind, "text_field": cfg.text_field, "labels": labels},
        batch_size=cfg.batch_size, batch_format="numpy")
    eos = tokenizer.token_to_id(bpe.EOS_TOKEN)
    shape = {"seq_len": cfg.seq_len, "vocab_size": tokenizer.get_vocab_size(), "eos_id": eos}
    writers = {split: ExampleWriter(cfg.output, split, **shape) if cfg.kind == "classification"
               else ShardWriter(cfg.output, split, with_mask=cfg.kind == "chat", **shape)
               for split in ("train", "val")}
    summary = PrepareSummary(cfg.output, False)
    for batch in tokenized.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        for ids, mask, label, split, error, empty in zip(batch["ids"], batch["mask"], batch["label"], batch["split"],
                                                         batch["error"], batch["empty"]):
            if error:
                summary.bad_records += 1
                if cfg.on_bad_record == "fail":
                    raise PrepareError(f"bad record: {error} (on_bad_record=skip counts and skips such records)")
                if len(summary.bad_examples) < MAX_REPORTED_BAD:
                    summary.bad_examples.append(str(error))
                continue
            if empty:
                summary.empty_documents += 1
                continue
            if cfg.kind == "classification":
                writers[split].add(list(ids), int(label))
            elif cfg.kind == "chat":
                writers[split].add(list(ids), list(mask))
            else:
                writers[split].add(list(ids))
            summary.documents += 1
            summary.tokens += len(ids) + (cfg.kind == "pretrain")
        if progress:
            progress(summary.documents, summary.tokens)
    if summary.documents == 0:
        first = f"; first: {summary.bad_examples[0]}" if summary.bad_examples else ""
        raise PrepareError(f"no usable documents in {cfg.input} ({summary.bad_records} bad records, "
                           f"{summary.empty_documents} empty){first}")
    summary.splits = {split: writer.close() for split, writer in writers.items()}
    summary.shards = sum(len(s["shards"]) for s in summary.splits.values())
    return summary
