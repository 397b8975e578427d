"""`kiln prepare`: raw files -> tokenized, packed, checksummed shards with a manifest, via Ray Data.

Reading and tokenizing run as a Ray Data pipeline over the cluster's CPUs (`flat_map` over input
files, `map_batches` with the tokenizer), or in this process for a small input (data_pipeline/records.py).
The driver consumes the tokenized documents in input order
and packs them into fixed-length sequences, so the output is the same whatever the parallelism
(data_pipeline/prepare_packing.py; the settings and summary are data_pipeline/prepare_config.py's).

Preparing again into an existing output never touches it until the new dataset is complete
(data_pipeline/prepare_output.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from data_pipeline import records, storage
from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import token_dtype
from data_pipeline.examples import ExampleError, chat_messages, classification_example, label_map
from data_pipeline.preference import EXAMPLE_ROWS, IdenticalAnswers, preference_row, row_text
from data_pipeline.prepare_config import KINDS, PrepareConfig, PrepareError, PrepareSummary
from data_pipeline.prepare_output import existing_manifest, replace_problem, write_dataset
from data_pipeline.prepare_packing import MAX_REPORTED_BAD, split_of, tokenize_and_pack, tokenize_batch
from data_pipeline.sources import detect_format, expand

__all__ = [
    "KINDS",
    "MAX_REPORTED_BAD",
    "GivenTokenizer",
    "PrepareConfig",
    "PrepareError",
    "PrepareSummary",
    "example_text",
    "fingerprint",
    "given_tokenizer",
    "prepare",
    "split_of",
    "tokenize_batch",
]


ENGINE_SAYS = {"local": "in this process", "ray": "by Ray Data over the CPUs of a Ray"}


def fingerprint(files: list[str], cfg: PrepareConfig, tokenizer_sha: str | None) -> str:
    """Hash of the inputs (names, sizes, modification stamps), the settings and the tokenizer."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output", "batch_size", "engine")}
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


def example_text(kind: str, text: str, text_field: str) -> str:
    """What the tokenizer is trained on for one record: the document, conversation or labelled text."""
    if kind == "pretrain":
        return text
    row = json.loads(text)
    if kind == "chat":
        return "\n".join(m["content"] for m in chat_messages(row))
    if kind == "preference":
        return row_text(preference_row(row))
    return classification_example(row, text_field)[0]


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
    size = records.input_bytes(files)
    engine = records.engine_for(cfg.engine, size)
    log(f"prepare: {size / 2**20:,.2f} MiB of input, read and tokenized {ENGINE_SAYS[engine]} (engine={cfg.engine})")
    dataset = records.read(files, formats, cfg.text_field, cfg.kind, engine)
    if cfg.on_bad_record == "fail":
        _stop_at_first_bad_record(dataset, cfg)

    def build(folder: str) -> tuple[PrepareSummary, dict]:
        return _build(folder, dataset, given, files, formats, key, cfg, log, progress, started)

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
    # conversations (kind=chat, and conversational pairs) are rendered as kind=chat renders them
    if legacy and cfg.kind in ("chat", "preference") and tokenizer.chat_template is not None:
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
    dataset,
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
    tokenizer, tokenizer_sha = _write_tokenizer(tokenizer_url, given, dataset, cfg, log)
    labels = _label_map(dataset, cfg) if cfg.kind == "classification" else None
    summary, section = tokenize_and_pack(dataset, tokenizer, tokenizer_url, folder, cfg, progress, labels)
    _check_splits(summary, cfg)
    summary.wall_s = time.perf_counter() - started
    extra: dict = {}
    if labels is not None:
        extra["label_map"] = labels
        storage.write_atomic(storage.join(folder, "label_map.json"), json.dumps(labels, indent=2))
    if cfg.kind == "chat":
        extra["chat"] = section
    if cfg.kind == "preference":  # a stored example is a pair: its chosen row, then its rejected row
        extra.update(example_rows=EXAMPLE_ROWS, preference=section)
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
        "source": _source_entry(files, formats, key, cfg),
        "split": {"method": "sha256(document text)", "val_fraction": cfg.val_fraction},
        "splits": summary.splits,
        "summary": {k: v for k, v in asdict(summary).items() if k not in ("output", "reused", "splits")},
    }


def _write_tokenizer(
    url: str, given: GivenTokenizer | None, dataset, cfg: PrepareConfig, log: Callable[[str], None]
) -> tuple[Any, str]:
    """The dataset's tokenizer written to url, and its sha256: a given folder copied as it is (or saved, when Kiln
    completed it), else one trained on the train split."""
    if given is not None and not given.changed:
        return given.tokenizer, bpe.copy_folder(given.folder, url)  # a model's folder, as it is
    tokenizer = given.tokenizer if given is not None else _train_tokenizer(dataset, cfg, log)
    return tokenizer, bpe.save(tokenizer, url)


def _source_entry(files: list[str], formats: list[str], key: str, cfg: PrepareConfig) -> dict:
    """The manifest's "source": what the dataset was prepared from, and the fingerprint that decides reuse."""
    return {
        "input": cfg.input,
        "files": len(files),
        "formats": sorted(set(formats)),
        "fingerprint": key,
        "text_field": cfg.text_field,
    }


def _check_splits(summary: PrepareSummary, cfg: PrepareConfig) -> None:
    """Training needs a whole sequence in each split: say which is empty and what to change."""
    for split, what in (("val", "validation"), ("train", "training")):
        entry = summary.splits[split]
        if entry["sequences"]:
            continue
        unit = "" if _per_example(cfg) else f", fewer tokens than one sequence of seq_len={cfg.seq_len}"
        who = f"val_fraction={cfg.val_fraction} put" if split == "val" else "it got"
        share = f"{who} {entry['documents']} of {summary.documents} documents{' in it' * (split == 'val')}{unit}"
        raise PrepareError(f"the {what} split of {cfg.output} would be empty: {share}; {_fix(split, summary, cfg)}")


def _fix(split: str, summary: PrepareSummary, cfg: PrepareConfig) -> str:
    """What to change so that split gets a sequence: a larger val_fraction if that can work, else more data."""
    if split == "train":
        return f"add more data, or lower seq_len (now {cfg.seq_len}) or val_fraction"
    per_sequence = 1 if _per_example(cfg) else cfg.seq_len
    needed = 2 * per_sequence / max(1, summary.documents if _per_example(cfg) else summary.tokens)
    if needed < 0.5:
        return f"add more data or raise val_fraction (e.g. val_fraction={max(needed, 2 * cfg.val_fraction):.2g})"
    return "add more data: there is too little for a validation split at this seq_len"


def _per_example(cfg: PrepareConfig) -> bool:
    """Whether each record is stored as one sequence of its own (a labelled text, a pair) rather than packed."""
    return cfg.kind in ("classification", "preference")


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
            except IdenticalAnswers as exc:  # refused whatever on_bad_record says: skipping it is no fix
                raise PrepareError(f"{row['source']}:{row['line']}: {exc}") from None
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
