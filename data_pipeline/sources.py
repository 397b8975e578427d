"""Raw documents from files: JSON Lines, Parquet, plain text, and `datasets` folders (save_to_disk).

Every reader yields `Record`s; a record that cannot be used carries an `error` naming its file and
line instead of raising, so `on_bad_record=skip` can count it and go on while `fail` stops on it.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

from data_pipeline import storage

FORMATS = ("jsonl", "parquet", "text", "hf", "csv")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".py": "text",
}


class SourceError(ValueError):
    """An input that cannot be read at all (missing path, unknown format); names the URL."""


@dataclass
class Record:
    """One document, or the reason it is unusable."""

    text: str
    source: str
    line: int  # 1-based line (JSONL, CSV), row (Parquet, hf) or 0 for a whole file
    error: str | None = None
    row: dict | None = None  # the whole row, when the caller asked for rows (chat, classification)


def expand(pattern: str) -> list[str]:
    """Files matching a path, folder or glob (local or fsspec URL); fails naming what was missing."""
    fs, path = storage.filesystem(pattern)
    protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    try:
        if any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path))
        elif fs.isdir(path):
            if fs.exists(posixpath.join(path, "state.json")):  # a datasets save_to_disk folder
                return [pattern]
            found = sorted(p for p in fs.find(path) if not posixpath.basename(p).startswith("."))
        elif fs.exists(path):
            found = [path]
        else:
            found = []
    except FileNotFoundError:
        found = []
    except PermissionError as exc:
        raise SourceError(f"cannot read {pattern}: access denied ({exc})") from None
    if not found:
        raise SourceError(f"no input files at {pattern}: check the path, glob or bucket name")
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in found]


def detect_format(url: str, requested: str) -> str:
    """The format of a file: the one asked for, else from its extension or folder layout."""
    if requested != "auto":
        return requested
    if storage.exists(storage.join(url, "state.json")):
        return "hf"
    ext = posixpath.splitext(url)[1].lower()
    if ext not in EXTENSIONS:
        raise SourceError(f"cannot tell the format of {url} from its extension; set format=jsonl|parquet|text|hf")
    return EXTENSIONS[ext]


def read_records(url: str, fmt: str, text_field: str | None) -> Iterator[Record]:
    """The documents of one input file (or hf folder); text_field=None yields whole rows instead."""
    if fmt == "jsonl":
        yield from _jsonl(url, text_field)
    elif fmt == "text":
        if text_field is None:
            yield Record("", url, 0, f"{url}: a plain text file has no rows; use JSONL, CSV or Parquet")
        else:
            yield from _text(url)
    elif fmt == "parquet":
        yield from _rows(url, _parquet_batches(url), text_field)
    elif fmt == "hf":
        yield from _rows(url, _arrow_batches(url), text_field)
    elif fmt == "csv":
        yield from _csv(url, text_field)
    else:
        raise SourceError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")


def _decode(url: str, data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return None, f"{url}:{line}: not UTF-8 (byte {exc.start}); re-encode the file as UTF-8"


def _text(url: str) -> Iterator[Record]:
    text, error = _decode(url, storage.read_bytes(url))
    yield Record(text or "", url, 0, error)


def _jsonl(url: str, text_field: str | None) -> Iterator[Record]:
    raw, error = _decode(url, storage.read_bytes(url))
    if error or raw is None:  # _decode gives exactly one of the two
        yield Record("", url, 0, error)
        return
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Record("", url, number, f"{url}:{number}: malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        yield _from_row(url, number, row, text_field)


def _csv(url: str, text_field: str | None) -> Iterator[Record]:
    import csv
    import io

    raw, error = _decode(url, storage.read_bytes(url))
    if error:
        yield Record("", url, 0, error)
        return
    reader = csv.DictReader(io.StringIO(raw))
    for row in reader:
        yield _from_row(url, reader.line_num, row, text_field)


def _from_row(url: str, number: int, row, text_field: str | None) -> Record:
    if not isinstance(row, dict):
        return Record("", url, number, f"{url}:{number}: expected a JSON object, got {type(row).__name__}")
    if text_field is None:
        return Record("", url, number, row=row)
    value = row.get(text_field)
    if text_field in row and isinstance(value, str):
        return Record(value, url, number)
    what = "missing" if text_field not in row else f"not a string ({type(value).__name__})"
    return Record("", url, number, f"{url}:{number}: field '{text_field}' is {what}; set text_field=NAME")


def _parquet_batches(url: str):
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=4096)


def _arrow_batches(url: str):
    import pyarrow as pa

    state = json.loads(storage.read_text(storage.join(url, "state.json")))
    for entry in state["_data_files"]:
        fs, path = storage.filesystem(storage.join(url, entry["filename"]))
        with fs.open(path, "rb") as handle:
            yield from pa.ipc.open_stream(handle)


def _rows(url: str, batches, text_field: str | None) -> Iterator[Record]:
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield _from_row(url, number, row, text_field)
