"""Tokenizing and packing for `kiln prepare`: the Ray Data tokenizer step, and the split writers fed in input order."""

from __future__ import annotations

import json
from collections.abc import Iterator

from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import ChatRowWriter, ExampleWriter, ShardWriter
from data_pipeline.examples import ChatRow, ExampleError, classification_example, encode_chat, reply_ends
from data_pipeline.preference import IdenticalAnswers, PreferencePair, PreferenceWriter, encode_preference
from data_pipeline.prepare_config import PrepareConfig, PrepareError, PrepareSummary
from data_pipeline.split import in_validation

MAX_REPORTED_BAD = 20


def split_of(text: str, val_fraction: float) -> str:
    """train or val, by a hash of the document's text: stable across runs, machines and file order."""
    # errors="replace": a lone surrogate (from a JSON escape) must not fail the split; these are the bytes
    # every existing prepared dataset was split by.
    return "val" if in_validation(text.encode("utf-8", errors="replace"), val_fraction) else "train"


_TOKENIZERS: dict = {}

# What tokenize_batch gives each record besides its split, and the value of each for a record without it: token ids
# (kind=preference: prompt + chosen), mask (chat), class id (classification), prompt + rejected, the shared prompt's
# length and whether it tokenized differently alone (preference), why the record is bad, whether it is empty, and
# the one-line reason it stops the preparation whatever on_bad_record says (a pair whose answers are identical).
NO_VALUES: dict[str, object] = {
    "ids": [],
    "mask": [],
    "label": -1,
    "rejected": [],
    "prompt_len": 0,
    "prompt_mismatch": False,
    "error": "",
    "empty": False,
    "refused": "",
}
COLUMNS = (*NO_VALUES, "split")


def tokenize_batch(
    batch: dict, tokenizer_url: str, val_fraction: float, kind: str, text_field: str, labels: dict | None = None
) -> dict:
    """Ray Data UDF: token ids (and chat mask, class id or preference pair), split and status of a batch of records."""
    tokenizer = _TOKENIZERS.get(tokenizer_url)
    if tokenizer is None:  # once per worker process, read from storage
        tokenizer = _TOKENIZERS[tokenizer_url] = bpe.load(tokenizer_url)
    texts = [str(t) for t in batch["text"]]
    out: dict[str, list] = {column: [] for column in NO_VALUES}
    out["split"] = [split_of(t, val_fraction) for t in texts]
    for text, error, source, line in zip(texts, batch["error"], batch["source"], batch["line"], strict=False):
        record = {**NO_VALUES, "error": str(error) if error else "", "empty": not error and not text.strip()}
        if not error and text.strip():
            try:
                record.update(_encoded(tokenizer, text, kind, text_field, labels))
            except IdenticalAnswers as exc:
                record["refused"] = f"{source}:{line}: {exc}"
            except ExampleError as exc:
                record["error"] = f"{source}:{line}: {exc}"
        for column, value in record.items():
            out[column].append(value)
    return out


def _encoded(tokenizer, text: str, kind: str, text_field: str, labels: dict | None) -> dict[str, object]:
    """One good record's columns for its kind (ExampleError if it is not a valid example of it)."""
    if kind == "chat":
        row = encode_chat(tokenizer, json.loads(text))
        return {"ids": row.ids, "mask": row.mask}
    if kind == "preference":
        pair = encode_preference(tokenizer, json.loads(text))
        return {
            "ids": pair.chosen,
            "rejected": pair.rejected,
            "prompt_len": pair.prompt_len,
            "prompt_mismatch": pair.prompt_mismatch,
        }
    if kind == "classification":
        if labels is None:
            raise ValueError("tokenize_batch: kind=classification needs the label map (labels=)")
        sample, name = classification_example(json.loads(text), text_field)
        return {"ids": bpe.text_ids(tokenizer, sample), "label": labels[name]}
    ids = bpe.document_ids(tokenizer, text)
    assert ids[-1] == tokenizer.eos_token_id
    return {"ids": ids}


def tokenize_and_pack(
    dataset, tokenizer, tokenizer_url: str, folder: str, cfg: PrepareConfig, progress, labels: dict | None
) -> tuple[PrepareSummary, dict]:
    """Tokenize every record (Ray Data) and write the splits; returns the summary and, for chat and preference,
    what the manifest says of its rows."""
    tokenized = _tokenized(dataset, tokenizer_url, cfg, labels)
    writers = {split: _writer(folder, split, tokenizer, cfg) for split in ("train", "val")}
    summary = PrepareSummary(cfg.output, False)
    ends: set[int] = set()  # the ids that end a reply (kind=chat): where generation stops
    for batch in tokenized.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        for record in _records(batch):
            if not _skipped(summary, record, cfg) and _written(writers[record["split"]], record, ends):
                summary.documents += 1
                summary.tokens += len(record["ids"]) + len(record["rejected"])
        if progress:
            progress(summary.documents, summary.tokens)
    _count_left_out(summary, list(writers.values()))
    _require_documents(summary, cfg)
    summary.splits = {split: writer.close() for split, writer in writers.items()}
    summary.shards = sum(len(s["shards"]) for s in summary.splits.values())
    return summary, _kind_manifest(tokenizer, cfg, summary, ends)


def _records(batch: dict) -> Iterator[dict]:
    """The records of a tokenized batch, one dict of COLUMNS each."""
    for values in zip(*(batch[column] for column in COLUMNS), strict=True):
        yield dict(zip(COLUMNS, values, strict=True))


def _count_left_out(summary: PrepareSummary, writers: list) -> None:
    """What the chat and preference writers cut or left out, into the summary."""
    for writer in writers:
        if isinstance(writer, ChatRowWriter):
            summary.truncated += writer.truncated
            summary.dropped += writer.dropped
        elif isinstance(writer, PreferenceWriter):
            summary.truncated += writer.counts["truncated"]
            summary.dropped += writer.counts["dropped"]
            summary.identical += writer.counts["identical"]
            summary.prompt_mismatch += writer.counts["prompt_mismatch"]


def _kind_manifest(tokenizer, cfg: PrepareConfig, summary: PrepareSummary, ends: set[int]) -> dict:
    """The manifest's section for cfg.kind (chat, preference), or {} for the kinds that have none."""
    if cfg.kind == "chat":
        return _chat_manifest(tokenizer, cfg, summary, ends)
    if cfg.kind == "preference":
        return _preference_manifest(tokenizer, cfg, summary)
    return {}


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


def _skipped(summary: PrepareSummary, record: dict, cfg: PrepareConfig) -> bool:
    """Whether a tokenized record is left out, bad or empty (counted; with on_bad_record=fail a bad one stops it).
    A refused record stops the preparation whatever on_bad_record says."""
    if record["refused"]:
        raise PrepareError(str(record["refused"]))
    error = record["error"]
    if error:
        summary.bad_records += 1
        if cfg.on_bad_record == "fail":
            raise PrepareError(f"bad record: {error} (on_bad_record=skip counts and skips such records)")
        if len(summary.bad_examples) < MAX_REPORTED_BAD:
            summary.bad_examples.append(str(error))
        return True
    if record["empty"]:
        summary.empty_documents += 1
        return True
    return False


Writer = ShardWriter | ChatRowWriter | ExampleWriter | PreferenceWriter


def _written(writer: Writer, record: dict, ends: set[int]) -> bool:
    """Add one tokenized record to its split's writer; False when the writer drops it (a chat row or a pair over
    seq_len). A chat row's reply-ending ids are added to ends."""
    if isinstance(writer, ExampleWriter):  # kind=classification
        writer.add(list(record["ids"]), int(record["label"]))
    elif isinstance(writer, ChatRowWriter):
        row = ChatRow([int(i) for i in record["ids"]], [int(m) for m in record["mask"]])
        ends.update(reply_ends(row))
        return writer.add(row.ids, row.mask)
    elif isinstance(writer, PreferenceWriter):
        chosen, rejected = ([int(i) for i in record[column]] for column in ("ids", "rejected"))
        return writer.add(PreferencePair(int(record["prompt_len"]), chosen, rejected, bool(record["prompt_mismatch"])))
    else:
        writer.add(list(record["ids"]))
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


def _writer(folder: str, split: str, tokenizer, cfg: PrepareConfig) -> Writer:
    """The writer of one split for cfg.kind: packed documents, one conversation a row, one example a row, or one
    pair an example."""
    vocab_size, eos = len(tokenizer), tokenizer.eos_token_id
    if cfg.kind == "classification":
        return ExampleWriter(folder, split, seq_len=cfg.seq_len, vocab_size=vocab_size, eos_id=eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # masked: never learned
    if cfg.kind == "chat":
        return ChatRowWriter(
            folder, split, seq_len=cfg.seq_len, vocab_size=vocab_size, pad_id=pad, overflow=cfg.overflow
        )
    if cfg.kind == "preference":
        return PreferenceWriter(
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


def _preference_manifest(tokenizer, cfg: PrepareConfig, summary: PrepareSummary) -> dict:
    """What a preference dataset's manifest says of its pairs: how they were tokenized, laid out, masked and cut."""
    if not tokenizer.chat_template:
        template = "none"
    else:
        template = "kiln" if tokenizer.chat_template == bpe.kiln_chat_template() else "tokenizer"
    return {
        "layout": "one pair per example: prompt + chosen, then prompt + rejected, seq_len tokens each",
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "template": template,  # renders conversational pairs; string pairs need none
        "mask": "each answer's tokens: after the prompt's and prompt + answer's common prefix (TRL 1.16)",
        "eos": "a string answer ends with the EOS text unless it does (TRL 1.16); a conversation as its template ends",
        "truncation": "each sequence cut at seq_len, the prompt kept; a pair whose prompt fills seq_len dropped",
        "overflow": cfg.overflow,
        "truncated": summary.truncated,
        "dropped": summary.dropped,
        "identical": summary.identical,
        "prompt_mismatch": summary.prompt_mismatch,
    }
