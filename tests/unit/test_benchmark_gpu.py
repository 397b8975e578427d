"""benchmarks/gpu.py cannot run without a GPU, but every config it trains composes here (and zero3 + compile is
refused, as its table says), so the GPU run does not fail on a typo."""

from __future__ import annotations

import pytest

from benchmarks import gpu, gpu_llama


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


def test_the_dry_run_composes_both_llama_rows_and_prints_the_torchtitan_command_of_each_release(capsys):
    assert gpu_llama.dry_run() == 0
    out = capsys.readouterr().out
    for preset in ("llama3_1b", "llama3_8b"):
        assert f"llama {preset} Kiln: composes" in out
    assert (
        out.count("torchtitan 0.3.0: torchrun --nproc-per-node 1 -m torchtitan.train --module=benchmarks.gpu_llama")
        == 2
    )
    assert out.count("torchtitan 0.2.2: torchrun --nproc-per-node 1 -m torchtitan.train --model.name=llama3") == 2


def options(args: list[str]) -> dict[str, str | None]:
    """torchtitan arguments back into {option: value} (None for a switch; a subcommand keeps its own name)."""
    parsed: dict[str, str | None] = {}
    for arg in args:
        key, _, value = arg.removeprefix("--").partition("=")
        parsed[key] = value or None
    return parsed


@pytest.mark.parametrize("row", gpu_llama.ROWS, ids=lambda row: row.preset)
def test_torchtitan_trains_the_kiln_rows_shape_batch_sequence_and_checkpointing(row):
    cfg = gpu_llama.kiln_config(row)
    flavor, shape = gpu_llama.TITAN_FLAVORS[row.preset]
    assert gpu_llama.kiln_shape(cfg.model) == {**shape, **gpu_llama.LLAMA3}  # torchtitan's flavour, checked there too
    assert cfg.strategy.name == "fsdp" and cfg.strategy.precision == "bf16"
    assert cfg.model.activation_checkpointing == row.checkpointing and not cfg.model.compile
    plan = gpu_llama.titan_plan(row, row.end)
    batch = (plan["local_batch_size"], plan["global_batch_size"], plan["seq_len"], plan["steps"])
    assert batch == (cfg.train.micro_batch, cfg.train.global_batch, cfg.data.seq_len, row.end)
    assert plan["log_freq"] == cfg.train.log_every and plan["lr"] == cfg.optim.lr
    assert plan["warmup_steps"] == cfg.optim.warmup_steps and plan["compile"] == cfg.model.compile
    # The run is stopped at the window's last step, before its final evaluation and checkpoint.
    assert cfg.train.max_steps > row.end and cfg.train.checkpoint_every > row.end and cfg.train.eval_every > row.end
    mode = "full" if row.checkpointing else "none"
    latest = options(gpu_llama.titan_args(plan, "0.3.0", "TOK", "DATA", "DUMP"))
    older = options(gpu_llama.titan_args(plan, "0.2.2", "TOK", "DATA", "DUMP"))
    assert latest["module"] == "benchmarks.gpu_llama" and callable(getattr(gpu_llama, latest["config"]))
    assert latest["config"] == f"titan_{flavor.lower()}" and f"activation-checkpoint:{mode}" in latest
    assert older["model.flavor"] == flavor and older["activation-checkpoint.mode"] == mode
    for got in (latest, older):
        batch = [got[f"training.{key}"] for key in ("local-batch-size", "global-batch-size", "seq-len", "steps")]
        assert batch == [str(cfg.train.micro_batch), str(cfg.train.global_batch), str(cfg.data.seq_len), str(row.end)]
        assert got["training.mixed-precision-param"] == "bfloat16"
        assert got["training.mixed-precision-reduce"] == "float32"
        assert got["metrics.log-freq"] == str(cfg.train.log_every)
        assert "compile.no-enable" in got and "checkpoint.no-enable" in got


def test_a_torchtitan_flavour_of_another_shape_stops_its_run():
    shape = {**gpu_llama.TITAN_FLAVORS["llama3_8b"][1], **gpu_llama.LLAMA3}
    gpu_llama.check_titan_shape("8B", shape)
    with pytest.raises(ValueError, match="torchtitan's 8B flavour is"):
        gpu_llama.check_titan_shape("8B", {**shape, "ffn_dim": 11008})


def test_the_release_follows_what_torch_has():
    import torch.distributed.fsdp as fsdp

    expected = "0.3.0" if hasattr(fsdp, "DataParallelMeshDims") else "0.2.2"
    assert gpu_llama.titan_version() == expected


def titan_line(step: int, loss: float, memory: float, tps: int) -> str:
    """A line of torchtitan's training log with colours off, as its metrics.py prints it (0.2.2 and 0.3.0)."""
    return (
        f"[titan] 2026-12-01 10:00:00,000 - root - INFO - step: {step:2}  loss: {loss:8.5f}  grad_norm: {1.0:7.4f}  "
        f"memory: {memory:5.2f}GiB(50.00%)  tps: {tps:,}  tflops: 400.00  mfu: 40.00%"
    )


def test_both_systems_tokens_per_second_cover_the_same_window():
    # torchtitan logs step 1 and every 5th; each tps covers the steps since the line before.
    logged = [
        (1, 11.0, 9.0, 100),
        (5, 9.0, 30.0, 1000),
        (10, 8.0, 31.5, 2000),
        (15, 7.5, 31.0, 4000),
        (20, 7.0, 31.0, 4000),
    ]
    log = "\n".join([*(titan_line(*line) for line in logged), "step: garbage"])
    tokens = gpu_llama.TOKENS_PER_STEP
    measured = gpu_llama.titan_window(log, skip=10, end=20)
    assert measured["tokens_per_s"] == pytest.approx(4000) and measured["steps"] == [10, 20]
    assert measured["peak_mem_gib"] == 31.5 and measured["loss"] == 7.0 and measured["memory"] == "reserved"
    assert gpu_llama.titan_window(log, skip=5, end=15)["tokens_per_s"] == pytest.approx(10 / (5 / 2000 + 5 / 4000))
    with pytest.raises(ValueError, match="no steps 10 to 25"):
        gpu_llama.titan_window(log, skip=10, end=25)
    # Kiln: the metrics.jsonl rows of the same steps, 5 steps' tokens every 2 s.
    rows = [
        {
            "step": s,
            "time": 100.0 + 0.4 * s,
            "perf/step_time_s": 0.4,
            "perf/peak_mem_mb": 1024.0 * s,
            "train/loss": 9 - s / 10,
        }
        for s in range(5, 21, 5)
    ]
    kiln = gpu_llama.kiln_window([{"step": 0, "time": 99.0, "val/loss": 9.0}, *rows], skip=10, end=20)
    assert kiln["tokens_per_s"] == pytest.approx(10 * tokens / 4.0) and kiln["peak_mem_gib"] == 20.0
    assert kiln["loss"] == pytest.approx(7.0) and kiln["memory"] == "allocated"


def test_the_llama_table_gives_kiln_to_torchtitan_and_why_a_pair_did_not_run():
    entries = [
        {"model": "llama3_1b", "system": "Kiln", "version": None, "strategy": "fsdp (FSDP2, bf16)"},
        {"model": "llama3_1b", "system": "torchtitan", "version": "0.3.0", "strategy": "FSDP2, bf16"},
        {"model": "llama3_8b", "system": "Kiln", "version": None, "strategy": "fsdp", "failed": "not run: needs"},
    ]
    entries[0].update(tokens_per_s=45000.0, mfu=0.375, peak_mem_gib=50.04)
    entries[1].update(tokens_per_s=50000.0, mfu=0.4166, peak_mem_gib=40.0)
    text = gpu.render({"date": "d", "machine": "m", "quick": False, "steps": 60, "cases": [], "llama": entries})
    assert "| llama3_1b | Kiln | fsdp (FSDP2, bf16) | 45,000 | 37.5% | 50.0 | 0.90 |" in text
    assert "| llama3_1b | torchtitan 0.3.0 | FSDP2, bf16 | 50,000 | 41.7% | 40.0 | - |" in text
    assert "| llama3_8b | Kiln | fsdp | not run: needs | | | |" in text


def test_the_mesh_rows_compose_for_8_gpus_and_say_when_a_machine_has_fewer():
    from benchmarks import gpu_mesh

    shapes = {row.name: row.shape() for row in gpu_mesh.ROWS}
    assert shapes == {"FSDP": (1, 8, 1), "FSDP x TP": (1, 4, 2), "HSDP": (2, 4, 1), "HSDP x TP": (2, 2, 2)}
    assert gpu_mesh.dry_run() == 0
    entries = [
        {"row": "FSDP x TP", "shape": [1, 4, 2], "compile": False, "tokens_per_s_per_gpu": 2881.0, "mfu": 0.2},
        {"row": "HSDP", "shape": [2, 4, 1], "compile": False, "not_run": "not run: needs 8 GPUs, this machine has 1"},
    ]
    table = "\n".join(gpu_mesh.render(entries))
    assert "| FSDP x TP | (1, 4, 2) | 2,881 | 20.0% | 50% |" in table
    assert "| HSDP | (2, 4, 1) | not run: needs 8 GPUs, this machine has 1 | | |" in table
