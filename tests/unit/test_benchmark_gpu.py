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
