"""The driver's live view of a run: one `rich` progress line fed by the run's metrics.jsonl."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from data_pipeline import storage


class MetricsTail:
    """New rows of a metrics.jsonl since the last call (local files are read incrementally)."""

    def __init__(self, url: str):
        self.url, self.offset = url, 0
        self.rows_seen = 0
        self.last_step: int | None = None  # the newest step seen, so nobody re-reads the file for it

    def new_rows(self) -> list[dict]:
        """Rows appended since the previous call."""
        if storage.is_local(self.url):
            try:
                with open(self.url, "rb") as handle:
                    handle.seek(self.offset)
                    chunk = handle.read()
            except FileNotFoundError:
                return []
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self.offset += len(complete)
            lines = complete.decode("utf-8").splitlines()
        else:
            try:
                lines = storage.read_text(self.url).splitlines()[self.rows_seen :]
            except FileNotFoundError:
                return []
            self.rows_seen += len(lines)
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        steps = [int(r["step"]) for r in rows if "step" in r]
        if steps:
            self.last_step = max(steps + ([self.last_step] if self.last_step is not None else []))
        return rows


class ProgressView:
    """step/max, loss, tokens/s and ETA on one line."""

    def __init__(self, console: Console, max_steps: int, start_step: int = 0):
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(bar_width=24),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("val ppl {task.fields[ppl]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=max_steps, completed=start_step, loss="-", tps="-", ppl="-")
        self.first_val_ppl: float | None = None
        self.last_val_ppl: float | None = None

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, rows: list[dict]) -> None:
        """Fold new metric rows into the line."""
        for row in rows:
            fields: dict[str, Any] = {}  # custom task fields, passed on as **kwargs
            if "train/loss" in row:
                fields["loss"] = f"{row['train/loss']:.3f}"
            if "perf/tokens_per_s" in row:
                fields["tps"] = f"{row['perf/tokens_per_s']:,.0f}"
            if "val/perplexity" in row:
                ppl = row["val/perplexity"]
                fields["ppl"] = f"{ppl:,.1f}"
                if self.first_val_ppl is None and row.get("step") == 0:
                    self.first_val_ppl = ppl
                self.last_val_ppl = ppl
            self.progress.update(self.task, completed=int(row.get("step", 0)), **fields)
