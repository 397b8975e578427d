"""Tokenizing and packing for `kiln prepare`: the Ray Data tokenizer step, and the split writers fed in input order."""

from __future__ import annotations

import json

from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import ChatRowWriter, ExampleWriter, ShardWriter
from data_pipeline.examples import ChatRow, ExampleError, classification_example, encode_chat, reply_ends
from data_pipeline.prepare_config import PrepareConfig, PrepareError, PrepareSummary
from data_pipeline.split import in_validation

MAX_REPORTED_BAD = 20


def split_of(text: str, val_fraction: float) -> str:
    """train or val, by a hash of the document's text: stable across runs, machines and file order."""
    # errors="replace": a lone surrogate (from a JSON escape) must not fail the split; these are the bytes
    # every existing prepared dataset was split by.
    return "val" if in_validation(text.encode("utf-8", errors="replace"), val_fraction) else "train"


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


def tokenize_and_pack(
    dataset, tokenizer, tokenizer_url: str, folder: str, cfg: PrepareConfig, progress, labels: dict | None
) -> tuple[PrepareSummary, dict]:
    """Tokenize every record (Ray Data) and write the splits; returns the summary and, for chat, what the
    manifest says of its rows."""
    tokenized = _tokenized(dataset, tokenizer_url, cfg, labels)
    writers = {split: _writer(folder, split, tokenizer, cfg) for split in ("train", "val")}
    summary = PrepareSummary(cfg.output, False)
    ends: set[int] = set()  # the ids that end a reply (kind=chat): where generation stops
    for batch in tokenized.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        for ids, mask, label, split, error, empty in zip(
            batch["ids"], batch["mask"], batch["label"], batch["split"], batch["error"], batch["empty"], strict=False
        ):
            if not _skipped(summary, error, empty, cfg) and _written(writers[split], ids, mask, label, ends):
                summary.documents += 1
                summary.tokens += len(ids)
        if progress:
            progress(summary.documents, summary.tokens)
    chat_writers = [w for w in writers.values() if isinstance(w, ChatRowWriter)]
    summary.truncated = sum(w.truncated for w in chat_writers)
    summary.dropped = sum(w.dropped for w in chat_writers)
    _require_documents(summary, cfg)
    summary.splits = {split: writer.close() for split, writer in writers.items()}
    summary.shards = sum(len(s["shards"]) for s in summary.splits.values())
    return summary, _chat_manifest(tokenizer, cfg, summary, ends) if chat_writers else {}


def _tokenized(dataset, tokenizer_url: str, cfg: PrepareConfig, labels: dict | None):
    """The records, tokenized by tokenize_batch over Ray Data's workers (lazily: the driver pulls the batches)."""
    return dataset.map_batches(
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


def _skipped(summary: PrepareSummary, error, empty, cfg: PrepareConfig) -> bool:
    """Whether a tokenized record is left out, bad or empty (counted; with on_bad_record=fail a bad one stops it)."""
    if error:
        summary.bad_records += 1
        if cfg.on_bad_record == "fail":
            raise PrepareError(f"bad record: {error} (on_bad_record=skip counts and skips such records)")
        if len(summary.bad_examples) < MAX_REPORTED_BAD:
            summary.bad_examples.append(str(error))
        return True
    if empty:
        summary.empty_documents += 1
        return True
    return False


def _written(writer: ShardWriter | ChatRowWriter | ExampleWriter, ids, mask, label, ends: set[int]) -> bool:
    """Add one tokenized record to its split's writer; False when the writer drops it (a chat row over seq_len).
    A chat row's reply-ending ids are added to ends."""
    if isinstance(writer, ExampleWriter):  # kind=classification
        writer.add(list(ids), int(label))
    elif isinstance(writer, ChatRowWriter):
        row = ChatRow([int(i) for i in ids], [int(m) for m in mask])
        ends.update(reply_ends(row))
        return writer.add(row.ids, row.mask)
    else:
        writer.add(list(ids))
    return True


def _require_documents(summary: PrepareSummary, cfg: PrepareConfig) -> None:
    """PrepareError unless some record made it into the dataset, saying what became of the others."""
    if summary.documents == 0:
        first = f"; first: {summary.bad_examples[0]}" if summary.bad_examples else ""
        dropped = f", {summary.dropped} longer than seq_len={cfg.seq_len}" if summary.dropped else ""
        raise PrepareError(
            f"no usable documents in {cfg.input} ({summary.bad_records} bad records, "
            f"{summary.empty_documents} empty{dropped}){first}"
        )


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
