"""A run's logged metrics as series and summaries: what `kiln plot` draws and `kiln compare` tabulates.

Pure functions over metrics.jsonl rows (dicts with `step`, `time` and metric names), so they are tested
without runs. A resumed run may log a step twice (once before a crash, again after the restore): the
last row of a step is the one that counts, as it is for the checkpointed model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# One line of metrics.jsonl, a JSON object as trainers.tracking.JsonlTracker writes it: `step` (an int), `time`
# and each metric's value (numbers). Read back unchecked, so readers test a value's type before they use it.
MetricRow = dict[str, float]
Rows = Sequence[MetricRow]  # one run's metrics.jsonl

NOT_METRICS = ("step", "time")
# Metrics that are better when smaller; every other metric is better when larger (accuracy, tokens/s, MFU).
LOWER_IS_BETTER = ("loss", "perplexity", "step_time", "wait", "_bytes", "mem_mb")


def series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric in step order; a step logged twice keeps its last value."""
    by_step: dict[int, float] = {}
    for row in rows:
        if key in row and isinstance(row[key], int | float):
            by_step[int(row["step"])] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def metric_names(rows: Rows) -> list[str]:
    """Every metric the rows log, sorted."""
    return sorted({k for row in rows for k in row if k not in NOT_METRICS})


def lower_is_better(key: str) -> bool:
    """Whether the best value of this metric is its smallest."""
    return any(part in key for part in LOWER_IS_BETTER)


@dataclass(frozen=True)
class MetricSummary:
    """A metric's last logged value and its best, with the steps they were logged at."""

    final: float
    final_step: int
    best: float
    best_step: int


def summarize(rows: Rows, key: str) -> MetricSummary | None:
    """Final and best value of one metric (None if never logged); ties keep the earliest step."""
    steps, values = series(rows, key)
    if not steps:
        return None
    pick = min if lower_is_better(key) else max
    best = pick(values)
    return MetricSummary(values[-1], steps[-1], best, steps[values.index(best)])


def comparison(runs: Mapping[str, Rows], keys: Sequence[str]) -> dict[str, dict[str, MetricSummary]]:
    """metric -> run id -> its summary, for the metrics any of the runs logged (in `keys` order)."""
    table: dict[str, dict[str, MetricSummary]] = {}
    for key in keys:
        summaries = {run: s for run, rows in runs.items() if (s := summarize(rows, key)) is not None}
        if summaries:
            table[key] = summaries
    return table
