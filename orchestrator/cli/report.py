"""`kiln plot` (PNG curves of runs, overlaid) and `kiln compare` (their final and best metrics, side by side)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from orchestrator.cli.options import add_json, add_storage_root
from orchestrator.config import UsageError
from orchestrator.run.metrics import MetricRow, MetricSummary, comparison, metric_names
from orchestrator.run.registry import RunRegistry, UnknownRun

# kiln compare's rows when a run logged them, in this order; other metrics follow with --all.
COMPARED = (
    "val/loss",
    "val/perplexity",
    "val/accuracy",
    "val/mlm_accuracy",
    "val/f1_macro",
    "train/loss",
    "perf/tokens_per_s",
    "perf/tflops",
    "perf/mfu",
    "perf/peak_mem_mb",
)


def add_report_commands(sub, default_root: str) -> None:
    """`kiln plot` and `kiln compare`."""
    ids_help = "run ids; a sweep id stands for all of its trials"
    plot = sub.add_parser("plot", help="PNG charts of runs' loss, learning rate, tokens/s and MFU against step")
    plot.add_argument("ids", nargs="+", metavar="RUN", help=ids_help)
    plot.add_argument("--out", default="kiln-plots", help="folder for the PNGs (default: ./kiln-plots)")
    add_storage_root(plot, default_root)
    plot.set_defaults(func=cmd_plot)

    compare = sub.add_parser("compare", help="a table of runs' final and best metrics, side by side")
    compare.add_argument("ids", nargs="+", metavar="RUN", help=ids_help)
    compare.add_argument("--all", action="store_true", help="every logged metric, not only the usual ones")
    add_json(compare, "metric -> run -> {final, final_step, best, best_step}")
    add_storage_root(compare, default_root)
    compare.set_defaults(func=cmd_compare)


def runs_named(root: str, ids: list[str]) -> dict[str, list[MetricRow]]:
    """run id -> its metrics rows, for each id given (a sweep id expands to its trials, in trial order)."""
    from orchestrator.sweep import record as sweeps

    registry = RunRegistry(root)
    runs: dict[str, list[MetricRow]] = {}
    for name in ids:
        if name in registry.run_ids():
            members = [name]
        elif name in sweeps.sweep_ids(root):
            members = [trial.run_id for trial in sweeps.load(root, name).trials]
        else:
            registry.load(name)  # raises UnknownRun naming the root and the closest ids
            members = [name]
        for run_id in members:
            rows = registry.metrics(run_id)
            if not rows:
                raise UnknownRun(f"run {run_id} under {root} has logged no metrics yet; plot it once it has trained")
            runs[run_id] = rows
    return runs


def cmd_plot(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.run.plots import render_all

    runs = runs_named(args.storage_root, args.ids)
    written = render_all(runs, Path(args.out))
    if not written:
        raise UsageError(f"{', '.join(runs)} logged none of the plotted metrics (train/loss, val/loss, ...)")
    for path, drawn in written.items():
        console.print(f"{path}  ({len(drawn)} series: {', '.join(sorted({d['metric'] for d in drawn}))})")
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    runs = runs_named(args.storage_root, args.ids)
    keys = sorted({k for rows in runs.values() for k in metric_names(rows)}) if args.all else list(COMPARED)
    table = comparison(runs, keys)
    if args.json:
        print(json.dumps({key: {run: vars(s) for run, s in by_run.items()} for key, by_run in table.items()}))
        return 0
    view = Table(box=box.SIMPLE_HEAD, title="final (at step) / best (at step)")
    view.add_column("metric")
    for run in runs:
        view.add_column(run, justify="right")
    for key, by_run in table.items():
        view.add_row(key, *(cell(by_run.get(run)) for run in runs))
    console.print(view)
    return 0


def cell(summary: MetricSummary | None) -> str:
    """`final @step / best @step`, or a dash where the run did not log the metric."""
    if summary is None:
        return "-"
    return f"{number(summary.final)} @{summary.final_step} / {number(summary.best)} @{summary.best_step}"


def number(value: float) -> str:
    """Four significant digits, thousands separated when large."""
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
