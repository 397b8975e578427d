"""benchmarks/gpu.py cannot run without a GPU, but every config it trains composes here (and zero3 + compile is
refused, as its table says), so the GPU run does not fail on a typo."""

from __future__ import annotations

import pytest

from benchmarks import gpu


def test_every_gpu_benchmark_run_composes_except_the_refused_zero3_compile(capsys):
    assert gpu.dry_run() == 0
    assert "refused: model.compile with strategy=zero3" in capsys.readouterr().out


def test_it_refuses_to_measure_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu.measure(quick=True)


def test_its_table_names_the_refusal_the_best_mfu_and_the_largest_offloaded_model():
    results = {
        "date": "2026-11-27",
        "machine": "m",
        "quick": False,
        "steps": 60,
        "gpu": "NVIDIA H100 80GB HBM3",
        "cases": [
            {"strategy": "ddp", "compile": True, "tokens_per_s": 5e5, "mfu": 0.47, "peak_mem_mb": 1e4, "loss": 3.0},
            {"strategy": "zero3", "compile": True, "refused": "model.compile with strategy=zero3: ..."},
        ],
        "ladder": [
            {"name": "gpt2-xl 1.5B", "shape": [48, 25, 1600], "ok": True, "peak_mem_mb": 9e3},
            {"name": "2.7B", "shape": [32, 32, 2560], "ok": False, "failed": "exit code 1"},
        ],
    }
    text = gpu.render(results)
    assert "| ddp | yes | 500,000 | 47.0% |" in text and "Best: ddp with model.compile at 47.0% MFU (meets" in text
    assert "| zero3 | yes | model.compile with strategy=zero3" in text
    assert "Largest GPT-2 shape trained with zero3_offload on one GPU: gpt2-xl 1.5B." in text
    results["ladder"][1:] = [
        {"name": "2.7B", "shape": [32, 32, 2560], "ok": True, "peak_mem_mb": 1e4},
        {"name": "6.7B", "shape": [32, 32, 4096], "ok": False, "failed": gpu.NOT_RUN, "not_run": True},
    ]
    text = gpu.render(results)
    assert "| 6.7B | 32 x 32 x 4096 | not run: the time budget was spent |" in text
    assert "on one GPU: 2.7B (6.7B not tried)." in text


def test_tokens_per_second_come_from_the_logged_rows_between_warm_up_and_the_final_step():
    # log_every=10 over 60 steps: rows at 10..60; the window is 20 -> 50 (the final row also evaluates and saves).
    rows = [
        {"step": s, "time": 100.0 + 0.2 * s, "perf/step_time_s": 0.2, "perf/peak_mem_mb": s, "train/loss": 6.0 - s / 60}
        for s in range(10, 61, 10)
    ]
    rows.append({"step": 60, "time": 200.0, "val/loss": 5.0})  # an evaluation row is not a training row
    measured = gpu.steady(rows, skip=20, tokens_per_step=1000)
    assert measured["steps"] == [20, 50] and measured["tokens_per_s"] == pytest.approx(5000)
    assert measured["peak_mem_mb"] == 60 and measured["loss"] == pytest.approx(5.0)


def test_a_spent_time_budget_skips_the_run_and_a_refused_case_never_runs(tmp_path):
    spent = gpu.Budget(0)
    assert not spent.allows_a_run() and gpu.Budget(None).allows_a_run() and gpu.Budget(600).allows_a_run()
    skipped = gpu.run_case("ddp", True, tmp_path, {}, gpu.FULL, spent, {})
    assert skipped["failed"] == "not run: the time budget was spent" and not list(tmp_path.iterdir())
    refused = gpu.run_case("zero3", True, tmp_path, {}, gpu.FULL, gpu.Budget(None), {})
    assert refused["refused"].startswith("model.compile with strategy=zero3")
