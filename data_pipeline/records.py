"""Where `kiln prepare` reads and tokenizes its records: Ray Data over the CPUs of a Ray, or this process alone.

Ray Data spreads reading and tokenizing over many processes, which pays for itself on gigabytes; on a small input
the Ray it starts costs more than the work (about 10 s and as many CPU-seconds before the first record). So
`engine=auto` reads inputs of up to LOCAL_MAX_BYTES in this process, and larger ones with Ray Data. Either way the
driver consumes the tokenized records in input order, so the dataset is byte for byte the same (the fingerprint
leaves the engine out, and tests/integration/test_prepare.py compares the two).

`LocalRecords` answers the three calls prepare makes of a materialized Ray dataset (`iter_rows`, `map_batches`,
and `iter_batches` on its result), with the same functions applied to the same batches.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, cast

from data_pipeline import storage
from data_pipeline.sources import read_records

ENGINES = ("auto", "ray", "local")
LOCAL_MAX_BYTES = 64 * 2**20  # engine=auto: inputs up to this size are read in this process


def engine_for(engine: str, input_bytes: int) -> str:
    """ "ray" or "local": the engine a preparation of input_bytes runs on, given the engine= setting."""
    if engine != "auto":
        return engine
    return "local" if input_bytes <= LOCAL_MAX_BYTES else "ray"


def input_bytes(files: list[str]) -> int:
    """The inputs' total size in bytes (a `datasets` folder counts its files)."""
    total = 0
    for url in files:
        fs, path = storage.filesystem(url)
        if fs.isdir(path):
            total += sum(size for _, size in storage.walk_files(url))
        else:
            total += int(fs.info(path).get("size") or 0)
    return total


def records_of(row: dict, text_field: str, kind: str) -> list[dict]:
    """The records of one input file, as prepare's rows: text (chat and classification records travel whole, as
    JSON), source, line and error ("" rather than None for none: an all-None column comes back from Arrow as NaN)."""
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


class LocalRecords:
    """Every record of the inputs, read in this process, in input order."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def iter_rows(self) -> Iterator[dict]:
        """The records one by one."""
        return iter(self.rows)

    def map_batches(
        self, fn: Callable[..., dict], *, fn_kwargs: dict, batch_size: int, batch_format: str = "numpy"
    ) -> LocalBatches:
        """fn applied to each batch_size records (columns as lists), lazily, as Ray Data's map_batches."""
        return LocalBatches(self.rows, fn, fn_kwargs, batch_size)


class LocalBatches:
    """LocalRecords.map_batches's result: its batches are made as they are read."""

    def __init__(self, rows: list[dict], fn: Callable[..., dict], fn_kwargs: dict, batch_size: int):
        self.rows, self.fn, self.fn_kwargs, self.batch_size = rows, fn, fn_kwargs, batch_size

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy") -> Iterator[dict]:
        """Each mapped batch, in order (prepare reads them by the size they were mapped by)."""
        for start in range(0, len(self.rows), self.batch_size):
            chunk = self.rows[start : start + self.batch_size]
            yield self.fn({key: [row[key] for row in chunk] for key in chunk[0]}, **self.fn_kwargs)


def read(files: list[str], formats: list[str], text_field: str, kind: str, engine: str) -> Any:
    """The records of files: a materialized Ray dataset (engine "ray"), or LocalRecords ("local")."""
    if engine == "local":
        pairs = zip(files, formats, strict=True)
        rows = [r for url, fmt in pairs for r in records_of({"url": url, "format": fmt}, text_field, kind)]
        return LocalRecords(rows)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # our own progress line says enough
    import ray

    if not ray.is_initialized():
        # "local": a bare ray.init() joins whatever `ray start` cluster /tmp/ray last recorded (or
        # RAY_ADDRESS), and waits forever when that cluster is gone; preparing runs on this machine.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same output whatever the parallelism
    context.enable_progress_bars = False
    items = [{"url": u, "format": f} for u, f in zip(files, formats, strict=True)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # Ray's annotation of flat_map's fn cannot express the arguments fn_kwargs supplies
    records = cast("Callable[[dict[str, Any]], list[dict[str, Any]]]", records_of)
    return dataset.flat_map(records, fn_kwargs={"text_field": text_field, "kind": kind}).materialize()
