"""`kiln prepare`: raw files -> tokenized, packed, checksummed shards with a manifest, via Ray Data.

Reading and tokenizing run as a Ray Data pipeline over the cluster's CPUs (`flat_map` over input
files, `map_batches` with the tokenizer). The driver consumes the tokenized documents in input order
and packs them into fixed-length sequences, so the output is the same whatever the parallelism.

Preparing again into an existing output never touches it until the new dataset is complete
(data_pipeline/prepare_output.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from data_pipeline import storage
from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import OVERFLOW, ChatRowWriter, ExampleWriter, ShardWriter, token_dtype
from data_pipeline.examples import (
    ChatRow,
    ExampleError,
    chat_messages,
    classification_example,
    encode_chat,
    label_map,
    reply_ends,
)
from data_pipeline.prepare_output import existing_manifest, replace_problem, write_dataset
from data_pipeline.sources import FORMATS, detect_format, expand, read_records
from data_pipeline.split import in_validation

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
    tokenizer: str = "train"  # "train", or a transformers tokenizer folder (a model's, or a prepared dataset)
    vocab_size: int = 8192
    seq_len: int = 1024
    val_fraction: float = 0.01
    on_bad_record: str = "skip"
    kind: str = "pretrain"
    batch_size: int = 256  # documents per tokenizer call
    # kind=chat: a conversation longer than seq_len is cut there (its start kept) or dropped; counted either way
    overflow: str = "truncate"

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
        if not 0.0 < self.val_fraction < 0.5:
            raise PrepareError(
                f"val_fraction must be in (0, 0.5), got {self.val_fraction}: training evaluates "
                "on the validation split, so it needs a share of the documents (e.g. 0.05)"
            )
        if self.batch_size < 1:
            raise PrepareError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.overflow not in OVERFLOW:
            raise PrepareError(f"overflow must be one of {', '.join(OVERFLOW)}; got {self.overflow!r}")


@dataclass
class PrepareSummary:
    """What a preparation did (printed at the end, and kept in the manifest)."""

    output: str
    reused: bool
    documents: int = 0
    tokens: int = 0
    bad_records: int = 0
    empty_documents: int = 0
    truncated: int = 0  # kind=chat: conversations cut at seq_len
    dropped: int = 0  # kind=chat: conversations longer than seq_len left out (overflow=drop, or nothing left to learn)
    shards: int = 0
    wall_s: float = 0.0
    bad_examples: list[str] = field(default_factory=list)
    # split name -> its manifest entry; set once the splits are written. Kept out of repr and ==, and
    # out of the manifest's "summary" (the manifest holds it under "splits").
    splits: dict[str, dict] = field(default_factory=dict, repr=False, compare=False)

    @property
    def tokens_per_s(self) -> float:
        """Throughput over the whole preparation."""
        return self.tokens / self.wall_s if self.wall_s else 0.0


def split_of(text: str, val_fraction: float) -> str:
    """train or val, by a hash of the document's text: stable across runs, machines and file order."""
    # errors="replace": a lone surrogate (from a JSON escape) must not fail the split; these are the bytes
    # every existing prepared dataset was split by.
    return "val" if in_validation(text.encode("utf-8", errors="replace"), val_fraction) else "train"


def fingerprint(files: list[str], cfg: PrepareConfig, tokenizer_sha: str | None) -> str:
    """Hash of the inputs (names, sizes, modification stamps), the settings and the tokenizer."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output", "batch_size")}
    # format 3: complete tokenizer folders, chat rendered by the tokenizer's template, one conversation per row
    h.update(json.dumps({"settings": settings, "tokenizer": tokenizer_sha, "format": 3}, sort_keys=True).encode())
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
    return [
        {
            "text": json.dumps(r.row, default=str) if r.row is not None else r.text,
            "source": r.source,
            "line": r.line,
            "error": r.error or "",
        }
        for r in records
    ]


def example_text(kind: str, text: str, text_field: str) -> str:
    """What the tokenizer is trained on for one record: the document, conversation or labelled text."""
    if kind == "pretrain":
        return text
    row = json.loads(text)
    if kind == "chat":
        return "\n".join(m["content"] for m in chat_messages(row))
    return classification_example(row, text_field)[0]


_TOKENIZERS: dict = {}


def tokenize_batch(
    batch: dict, tokenizer_url: str, val_fraction: float, kind: str, text_field: str, labels: dict | None = None
) -> dict:
    """Ray Data UDF: token ids (and chat mask or class id), split and status of a batch of records."""
    tokenizer = _TOKENIZERS.get(tokenizer_url)
    if tokenizer is None:  # once per worker process, read from storage
        tokenizer = _TOKENIZERS[tokenizer_url] = bpe.load(tokenizer_url)
    eos = tokenizer.eos_token_id
    texts = [str(t) for t in batch["text"]]
    out: dict[str, list] = {
        "ids": [],
        "mask": [],
        "label": [],
        "error": [],
        "empty": [],
        "split": [split_of(t, val_fraction) for t in texts],
    }
    for text, error, source, line in zip(texts, batch["error"], batch["source"], batch["line"], strict=False):
        ids: list[int] = []
        mask: list[int] = []
        label = -1
        if not error and text.strip():
            try:
                if kind == "chat":
                    row = encode_chat(tokenizer, json.loads(text))
                    ids, mask = row.ids, row.mask
                elif kind == "classification":
                    if labels is None:
                        raise ValueError("tokenize_batch: kind=classification needs the label map (labels=)")
                    sample, name = classification_example(json.loads(text), text_field)
                    ids, label = bpe.text_ids(tokenizer, sample), labels[name]
                else:
                    ids = bpe.document_ids(tokenizer, text)
                    assert ids[-1] == eos
            except ExampleError as exc:
                error = f"{source}:{line}: {exc}"
        out["ids"].append(ids)
        out["mask"].append(mask)
        out["label"].append(label)
        out["error"].append(str(error) if error else "")
        out["empty"].append(not error and not text.strip())
    return out


def prepare(
    cfg: PrepareConfig, log: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None
) -> PrepareSummary:
    """Prepare cfg.input into cfg.output (or reuse it when nothing changed); returns the summary."""
    started = time.perf_counter()
    files = expand(cfg.input)
    formats = [detect_format(url, cfg.format) for url in files]
    given = None if cfg.tokenizer == "train" else given_tokenizer(cfg)
    key = fingerprint(files, cfg, bpe.folder_sha(given.folder) if given else None)
    existing = existing_manifest(cfg.output)
    if existing is not None and existing.get("source", {}).get("fingerprint") == key:
        log(f"prepare: inputs, settings and tokenizer unchanged: reusing {cfg.output}")
        return PrepareSummary(cfg.output, True, **existing["summary"])
    problem = replace_problem(cfg.output)
    if problem:
        raise PrepareError(problem)
    if existing is not None:
        log(
            f"prepare: {cfg.output} was prepared from other inputs or settings: preparing it again "
            "(the old dataset stays until the new one is complete)"
        )
    ray_dataset = _read(files, formats, cfg)
    if cfg.on_bad_record == "fail":
        _stop_at_first_bad_record(ray_dataset, cfg)

    def build(folder: str) -> tuple[PrepareSummary, dict]:
        return _build(folder, ray_dataset, given, files, formats, key, cfg, log, progress, started)

    summary = write_dataset(cfg.output, key, build)
    summary.output = cfg.output
    summary.wall_s = time.perf_counter() - started
    return summary


@dataclass
class GivenTokenizer:
    """A tokenizer folder given with tokenizer=, loaded; `changed` when Kiln completed it (a folder from before
    complete folders), so the dataset saves it rather than copying its files."""

    folder: str
    tokenizer: Any
    changed: bool = False


def given_tokenizer(cfg: PrepareConfig) -> GivenTokenizer:
    """The tokenizer= folder, checked for what cfg.kind needs (PrepareError in one line naming it and the fix)."""
    folder = _tokenizer_folder(cfg.tokenizer)
    try:
        tokenizer = bpe.load(folder)
        bpe.require_eos(tokenizer, f"tokenizer={cfg.tokenizer}")
    except bpe.TokenizerError as exc:
        raise PrepareError(str(exc)) from None
    legacy = not storage.exists(storage.join(folder, bpe.CONFIG_FILE))
    if legacy and cfg.kind == "chat" and tokenizer.chat_template is not None:
        tokenizer.chat_template = bpe.kiln_chat_template()  # Kiln's role tokens: its current template
    if cfg.kind == "chat" and not tokenizer.chat_template:
        raise PrepareError(
            f"tokenizer={cfg.tokenizer} has no chat template (chat_template in its {bpe.CONFIG_FILE} or "
            "chat_template.jinja), so Kiln cannot know how this model's conversations look: give the folder the "
            "model's template, or prepare with a tokenizer that has one"
        )
    return GivenTokenizer(folder, tokenizer, changed=legacy)


def _build(
    folder: str,
    ray_dataset,
    given: GivenTokenizer | None,
    files: list[str],
    formats: list[str],
    key: str,
    cfg: PrepareConfig,
    log: Callable[[str], None],
    progress,
    started: float,
) -> tuple[PrepareSummary, dict]:
    """Tokenizer, shards and label map written into folder; returns the summary and the manifest body."""
    tokenizer_url = storage.join(folder, "tokenizer")
    if given is not None and not given.changed:
        tokenizer = given.tokenizer
        tokenizer_sha = bpe.copy_folder(given.folder, tokenizer_url)  # a model's folder, as it is
    else:
        tokenizer = given.tokenizer if given is not None else _train_tokenizer(ray_dataset, cfg, log)
        tokenizer_sha = bpe.save(tokenizer, tokenizer_url)
    labels = _label_map(ray_dataset, cfg) if cfg.kind == "classification" else None
    summary, chat = _tokenize_and_pack(ray_dataset, tokenizer, tokenizer_url, folder, cfg, progress, labels)
    _check_splits(summary, cfg)
    summary.wall_s = time.perf_counter() - started
    extra: dict = {}
    if labels is not None:
        extra["label_map"] = labels
        storage.write_atomic(storage.join(folder, "label_map.json"), json.dumps(labels, indent=2))
    if cfg.kind == "chat":
        extra["chat"] = chat
    return summary, {
        **extra,
        "kind": cfg.kind,
        "seq_len": cfg.seq_len,
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
        "bos_id": tokenizer.bos_token_id,
        "pad_id": tokenizer.pad_token_id,
        "dtype": token_dtype(len(tokenizer)).str,
        "tokenizer": {"path": "tokenizer", "sha256": tokenizer_sha, "trained": given is None},
        "source": {
            "input": cfg.input,
            "files": len(files),
            "formats": sorted(set(formats)),
            "fingerprint": key,
            "text_field": cfg.text_field,
        },
        "split": {"method": "sha256(document text)", "val_fraction": cfg.val_fraction},
        "splits": summary.splits,
        "summary": {k: v for k, v in asdict(summary).items() if k not in ("output", "reused", "splits")},
    }


def _check_splits(summary: PrepareSummary, cfg: PrepareConfig) -> None:
    """Training needs a whole sequence in each split: say which is empty and what to change."""
    for split, what in (("val", "validation"), ("train", "training")):
        entry = summary.splits[split]
        if entry["sequences"]:
            continue
        unit = "" if cfg.kind == "classification" else f", fewer tokens than one sequence of seq_len={cfg.seq_len}"
        who = f"val_fraction={cfg.val_fraction} put" if split == "val" else "it got"
        share = f"{who} {entry['documents']} of {summary.documents} documents{' in it' * (split == 'val')}{unit}"
        raise PrepareError(f"the {what} split of {cfg.output} would be empty: {share}; {_fix(split, summary, cfg)}")


def _fix(split: str, summary: PrepareSummary, cfg: PrepareConfig) -> str:
    """What to change so that split gets a sequence: a larger val_fraction if that can work, else more data."""
    if split == "train":
        return f"add more data, or lower seq_len (now {cfg.seq_len}) or val_fraction"
    per_sequence = 1 if cfg.kind == "classification" else cfg.seq_len
    needed = 2 * per_sequence / max(1, summary.documents if cfg.kind == "classification" else summary.tokens)
    if needed < 0.5:
        return f"add more data or raise val_fraction (e.g. val_fraction={max(needed, 2 * cfg.val_fraction):.2g})"
    return "add more data: there is too little for a validation split at this seq_len"


def _tokenizer_folder(path: str) -> str:
    """path if it holds a tokenizer; else the tokenizer of the prepared dataset at path (or at its parent,
    for `<dataset>/tokenizer` of a dataset that keeps its files under v-<fingerprint>/)."""
    if bpe.is_folder(path):
        return path
    trimmed = path.rstrip("/")
    parent = trimmed.rsplit("/", 1)[0] if trimmed.endswith("/tokenizer") else None
    for dataset in filter(None, (trimmed, parent)):
        manifest = existing_manifest(dataset)
        if manifest is not None:
            folder = storage.join(dataset, str((manifest.get("tokenizer") or {}).get("path", "tokenizer")))
            if bpe.is_folder(folder):
                return folder
    raise PrepareError(
        f"tokenizer={path}: no tokenizer there ({bpe.TOKENIZER_FILE}, {bpe.CONFIG_FILE}); give a model's "
        "folder, a tokenizer folder, a prepared dataset, or tokenizer=train"
    )


def _read(files: list[str], formats: list[str], cfg: PrepareConfig):
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # our own progress line says enough
    import ray

    if not ray.is_initialized():
        # "local": a bare ray.init() joins whatever `ray start` cluster /tmp/ray last recorded (or
        # RAY_ADDRESS), and waits forever when that cluster is gone; preparing runs on this machine.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same output whatever the parallelism
    context.enable_progress_bars = False
    items = [{"url": u, "format": f} for u, f in zip(files, formats, strict=False)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # Ray's annotation of flat_map's fn cannot express the arguments fn_kwargs supplies
    records_of = cast("Callable[[dict[str, Any]], list[dict[str, Any]]]", _records_of)
    return dataset.flat_map(records_of, fn_kwargs={"text_field": cfg.text_field, "kind": cfg.kind}).materialize()


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
    return bpe.train_kiln_tokenizer(train_texts(), cfg.vocab_size)


def _stop_at_first_bad_record(dataset, cfg: PrepareConfig) -> None:
    """on_bad_record=fail: the first unreadable or invalid record, in input order, before any work on it."""
    for row in dataset.iter_rows():
        error = row["error"]
        if not error and cfg.kind != "pretrain" and row["text"].strip():
            try:
                example_text(cfg.kind, row["text"], cfg.text_field)
            except ExampleError as exc:
                error = f"{row['source']}:{row['line']}: {exc}"
        if error:
            raise PrepareError(f"bad record: {error} (on_bad_record=skip counts and skips such records)")


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


def _tokenize_and_pack(
    dataset, tokenizer, tokenizer_url: str, folder: str, cfg: PrepareConfig, progress, labels: dict | None
) -> tuple[PrepareSummary, dict]:
    """Tokenize every record (Ray Data) and write the splits; returns the summary and, for chat, what the
    manifest says of its rows."""
    tokenized = dataset.map_batches(
        tokenize_batch,
        fn_kwargs={
            "tokenizer_url": tokenizer_url,
            "val_fraction": cfg.val_fraction,
            "kind": cfg.kind,
            "text_field": cfg.text_field,
            "labels": labels,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
    )
    writers = {split: _writer(folder, split, tokenizer, cfg) for split in ("train", "val")}
    summary = PrepareSummary(cfg.output, False)
    ends: set[int] = set()  # the ids that end a reply (kind=chat): where generation stops
    for batch in tokenized.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        for ids, mask, label, split, error, empty in zip(
            batch["ids"], batch["mask"], batch["label"], batch["split"], batch["error"], batch["empty"], strict=False
        ):
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
            writer = writers[split]
            if isinstance(writer, ExampleWriter):  # kind=classification
                writer.add(list(ids), int(label))
            elif isinstance(writer, ChatRowWriter):
                row = ChatRow([int(i) for i in ids], [int(m) for m in mask])
                ends |= reply_ends(row)
                if not writer.add(row.ids, row.mask):
                    continue
            else:
                writer.add(list(ids))
            summary.documents += 1
            summary.tokens += len(ids)
        if progress:
            progress(summary.documents, summary.tokens)
    chat_writers = [w for w in writers.values() if isinstance(w, ChatRowWriter)]
    summary.truncated = sum(w.truncated for w in chat_writers)
    summary.dropped = sum(w.dropped for w in chat_writers)
    if summary.documents == 0:
        first = f"; first: {summary.bad_examples[0]}" if summary.bad_examples else ""
        dropped = f", {summary.dropped} longer than seq_len={cfg.seq_len}" if summary.dropped else ""
        raise PrepareError(
            f"no usable documents in {cfg.input} ({summary.bad_records} bad records, "
            f"{summary.empty_documents} empty{dropped}){first}"
        )
    summary.splits = {split: writer.close() for split, writer in writers.items()}
    summary.shards = sum(len(s["shards"]) for s in summary.splits.values())
    return summary, _chat_manifest(tokenizer, cfg, summary, ends) if chat_writers else {}


def _writer(folder: str, split: str, tokenizer, cfg: PrepareConfig) -> ShardWriter | ChatRowWriter | ExampleWriter:
    """The writer of one split for cfg.kind: packed documents, one conversation a row, or one example a row."""
    vocab_size, eos = len(tokenizer), tokenizer.eos_token_id
    if cfg.kind == "classification":
        return ExampleWriter(folder, split, seq_len=cfg.seq_len, vocab_size=vocab_size, eos_id=eos)
    if cfg.kind == "chat":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # masked: never learned
        return ChatRowWriter(
            folder, split, seq_len=cfg.seq_len, vocab_size=vocab_size, pad_id=pad, overflow=cfg.overflow
        )
    return ShardWriter(folder, split, seq_len=cfg.seq_len, vocab_size=vocab_size, eos_id=eos)


def _chat_manifest(tokenizer, cfg: PrepareConfig, summary: PrepareSummary, ends: set[int]) -> dict:
    """What a chat dataset's manifest says of its rows: how they were rendered, masked, cut and padded."""
    specials = set(bpe.vocabulary(tokenizer).specials)
    return {
        "template": "kiln" if tokenizer.chat_template == bpe.kiln_chat_template() else "tokenizer",
        "mask": "generation markers" if bpe.has_generation_markers(tokenizer.chat_template) else "prefix diff",
        "rows": "one conversation per row, padded with pad_id (mask 0)",
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "overflow": cfg.overflow,
        "truncated": summary.truncated,
        "dropped": summary.dropped,
        # the special tokens that end a learned reply: inference stops at them (generation_config)
        "end_of_turn_ids": sorted(i for i in ends if i in specials),
    }
