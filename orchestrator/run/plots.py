"""PNG charts of runs' curves against step, several runs overlaid: what `kiln plot` writes.

matplotlib's object API (a `Figure` with the Agg canvas), never pyplot: no global state, no display
needed. Each PNG records what it draws (run, metric, points) in its `Description` text chunk, so a
test, or a person with `exiftool`, can check the file holds the right series.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from matplotlib.figure import Figure

from orchestrator.run.metrics import Rows, series


@dataclass(frozen=True)
class Chart:
    """One PNG: its file name, title, y-axis label, the metrics it overlays, and a scale for display."""

    name: str
    title: str
    y_label: str
    metrics: tuple[str, ...]
    scale: float = 1.0
    log_y: bool = False


class Drawn(TypedDict):
    """One series a chart drew: the run, its metric and how many points (recorded in the PNG too)."""

    run: str
    metric: str
    points: int


CHARTS = (
    Chart("loss", "Loss", "cross-entropy (nats per token)", ("train/loss", "val/loss")),
    Chart("lr", "Learning rate", "learning rate", ("train/lr",)),
    Chart("throughput", "Throughput", "tokens per second (all workers)", ("perf/tokens_per_s",)),
    Chart("mfu", "Model FLOPs utilisation", "MFU (% of peak)", ("perf/mfu",), scale=100.0),
    Chart(
        "accuracy",
        "Validation accuracy",
        "accuracy",
        ("val/accuracy", "val/mlm_accuracy", "val/f1_macro"),
    ),
)


def render(chart: Chart, runs: Mapping[str, Rows], out: Path) -> list[Drawn]:
    """Draw `chart` for every run that logged one of its metrics into out; returns the series drawn ([] if none)."""
    figure = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    drawn: list[Drawn] = []
    for run, rows in runs.items():
        for metric in chart.metrics:
            steps, values = series(rows, metric)
            if not steps:
                continue
            label = run if len(chart.metrics) == 1 else f"{run}  {metric}"
            style = "o-" if len(steps) <= 30 else "-"  # sparse series (evaluations) show their points
            axes.plot(steps, [v * chart.scale for v in values], style, markersize=3, linewidth=1.4, label=label)
            drawn.append({"run": run, "metric": metric, "points": len(steps)})
    if not drawn:
        return []
    axes.set_title(f"{chart.title}: {', '.join(runs) if len(runs) <= 4 else f'{len(runs)} runs'}")
    axes.set_xlabel("step (optimizer steps)")
    axes.set_ylabel(chart.y_label)
    if chart.log_y:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    metadata = {"Title": chart.title, "Description": json.dumps({"chart": chart.name, "series": drawn})}
    figure.savefig(out, format="png", metadata=metadata)
    return drawn


def render_all(runs: Mapping[str, Rows], out_dir: Path) -> dict[Path, list[Drawn]]:
    """Every chart some run has data for, as out_dir/<chart>.png; returns each file and its series."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[Path, list[Drawn]] = {}
    for chart in CHARTS:
        path = out_dir / f"{chart.name}.png"
        drawn = render(chart, runs, path)
        if drawn:
            written[path] = drawn
    return written
