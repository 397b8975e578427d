"""What `kiln plot` and `kiln compare` make of metrics.jsonl rows, without runs."""

from __future__ import annotations

import json

from PIL import Image

from orchestrator.run.metrics import comparison, series, summarize
from orchestrator.run.plots import CHARTS, render, render_all

RESUMED = [  # crashed after step 3's row, restored from step 2, logged step 3 again
    {"step": 0, "time": 1.0, "val/loss": 6.0},
    {"step": 1, "time": 2.0, "train/loss": 5.0, "perf/tokens_per_s": 100.0},
    {"step": 2, "time": 3.0, "train/loss": 4.0, "perf/tokens_per_s": 120.0, "val/loss": 4.5, "val/accuracy": 0.2},
    {"step": 3, "time": 4.0, "train/loss": 9.0},
    {"step": 3, "time": 9.0, "train/loss": 3.5, "perf/tokens_per_s": 90.0},
    {"step": 4, "time": 10.0, "train/loss": 3.0, "val/loss": 4.7, "val/accuracy": 0.3},
]


def test_a_step_logged_twice_keeps_its_last_value():
    assert series(RESUMED, "train/loss") == ([1, 2, 3, 4], [5.0, 4.0, 3.5, 3.0])


def test_best_is_the_smallest_loss_and_the_largest_accuracy_or_throughput():
    val = summarize(RESUMED, "val/loss")
    assert val is not None and (val.final, val.final_step, val.best, val.best_step) == (4.7, 4, 4.5, 2)
    accuracy = summarize(RESUMED, "val/accuracy")
    assert accuracy is not None and (accuracy.best, accuracy.best_step) == (0.3, 4)
    speed = summarize(RESUMED, "perf/tokens_per_s")
    assert speed is not None and speed.best == 120.0
    assert summarize(RESUMED, "perf/mfu") is None


def test_comparison_lists_only_the_metrics_some_run_logged():
    other = [{"step": 1, "time": 1.0, "train/loss": 7.0}]
    table = comparison({"a": RESUMED, "b": other}, ["val/loss", "perf/mfu", "train/loss"])
    assert list(table) == ["val/loss", "train/loss"]
    assert set(table["val/loss"]) == {"a"} and table["train/loss"]["b"].final == 7.0


def test_two_runs_are_overlaid_in_one_chart_with_a_legend_entry_each(tmp_path):
    other = [{"step": s, "time": float(s), "train/loss": 6.0 - s, "val/loss": 6.5 - s} for s in range(1, 5)]
    loss = next(c for c in CHARTS if c.name == "loss")
    drawn = render(loss, {"a": RESUMED, "b": other}, tmp_path / "loss.png")
    assert [(d["run"], d["metric"], d["points"]) for d in drawn] == [
        ("a", "train/loss", 4),
        ("a", "val/loss", 3),
        ("b", "train/loss", 4),
        ("b", "val/loss", 4),
    ]
    with Image.open(tmp_path / "loss.png") as image:
        assert image.format == "PNG" and json.loads(image.text["Description"])["series"] == drawn


def test_charts_without_data_are_not_written(tmp_path):
    written = render_all({"a": RESUMED}, tmp_path)
    assert sorted(p.name for p in written) == ["accuracy.png", "loss.png", "throughput.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "loss.png", "throughput.png"]
