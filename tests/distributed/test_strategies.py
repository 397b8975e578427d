"""One config switch, six ways to shard: same losses as DDP, exact resume, and a faithful HF export.

Each strategy trains the same 20 steps of the tests' tiny Llama on 2 workers (fp32, attention dropout on, so RNG
restore matters).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, kiln, rows, runs_per_strategy, torchrun, torchrun_command
from tests.helpers import STRATEGY_RUN as RUN

pytestmark = pytest.mark.slow

STRATEGIES = ["ddp", "fsdp", "zero3", "zero3_offload"]  # ZeRO-1/2: tests/distributed/test_zero_reshard.py


@pytest.fixture
def trained(trained_runs):
    return trained_runs


def by_step(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows(run_dir) if key in r}


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_loss_curve_agrees_with_ddp(trained, strategy):
    reference, losses = by_step(trained("ddp"), "train/loss"), by_step(trained(strategy), "train/loss")
    assert sorted(losses) == list(range(1, 21))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-4), step
    manifest = json.loads((trained(strategy) / "checkpoints" / "step_000020" / "MANIFEST.json").read_text())
    assert manifest["strategy"] == strategy and manifest["world_size"] == 2


# ddp, fsdp and zero3: tests/integration/test_fault_tolerance.py (a real SIGKILL under Ray Train, bit for
# bit against these runs); zero1/zero2 share zero3's DeepSpeed save and load path.
@pytest.mark.parametrize("strategy", ["zero3_offload"])
def test_resume_from_step_10_is_bit_identical(trained, strategy, tmp_path):
    run_dir = tmp_path / strategy
    shutil.copytree(trained(strategy), run_dir)
    uninterrupted = {r["step"]: r for r in rows(run_dir) if "train/loss" in r}
    shutil.rmtree(run_dir / "checkpoints" / "step_000020")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(run_dir) if r["step"] <= 10))
    torchrun("--resume", strategy, "--storage-root", str(tmp_path))
    resumed = {r["step"]: r for r in rows(run_dir) if "train/loss" in r and r["step"] > 10}
    assert sorted(resumed) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed[step]["train/loss"] == uninterrupted[step]["train/loss"], step
        assert resumed[step]["train/grad_norm"] == uninterrupted[step]["train/grad_norm"], step


# DCP (ddp, fsdp) and DeepSpeed (zero*) checkpoints each consolidate through one path.
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_export_loads_in_transformers_with_the_trained_logits(trained, strategy, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    run_dir = trained(strategy)
    probe = tmp_path / "probe.pt"
    cmd = torchrun_command(
        str(REPO / "tests" / "distributed" / "probe_logits.py"), str(run_dir.parent), strategy, str(probe)
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    trained_logits = torch.load(probe, weights_only=True)

    # An earlier export's weights sit in the folder: refused, untouched; --overwrite replaces it whole.
    out = tmp_path / "hf"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"stale weights")
    refused = kiln("export", strategy, "--out", str(out), "--storage-root", str(run_dir.parent))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-3000:]
    assert f"{out} is not empty (pytorch_model.bin)" in refused.stderr and "--overwrite" in refused.stderr
    assert [p.name for p in out.iterdir()] == ["pytorch_model.bin"]
    exported = kiln("export", strategy, "--out", str(out), "--overwrite", "--storage-root", str(run_dir.parent))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "pytorch_model.bin").exists() and not list(tmp_path.glob(".kiln-*"))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model, loading = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(loading.values()), loading  # every weight read from the export, none initialised afresh
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=trained_logits["input_ids"]).logits
    assert trained_logits["step"] == 20
    torch.testing.assert_close(logits, trained_logits["logits"], rtol=1e-5, atol=1e-5)
    # The run's tokenizer folder, copied file for file: the export encodes (and stops) as the run did.
    run_tokenizer = {p.name: p.read_bytes() for p in (run_dir / "tokenizer").iterdir()}
    assert run_tokenizer and {name: (out / name).read_bytes() for name in run_tokenizer} == run_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_strategies_hold_a_world_size_share_of_ddp_bytes(trained, strategy):
    """Exact byte counts from each rank's own tensors (rank 0 reports), not timings or RSS."""

    def held(run_dir: Path) -> dict[str, float]:
        last = [r for r in rows(run_dir) if "perf/param_bytes" in r][-1]
        assert last["perf/peak_mem_mb"] > 0
        return {k: last[f"perf/{k}_bytes"] for k in ("param", "optim", "master")}

    ddp, sharded = held(trained("ddp")), held(trained(strategy))
    assert ddp["master"] == 0
    assert sharded["param"] == pytest.approx(ddp["param"] / 2, rel=0.01)  # padding to even partitions
    assert sharded["optim"] == pytest.approx(ddp["optim"] / 2, rel=0.01)
    if strategy == "zero3":  # plus an fp32 master copy of its own partition, which DDP does not keep
        assert sharded["master"] == sharded["param"]
    else:
        assert sharded["master"] == 0


def test_a_checkpoint_from_another_model_names_the_mismatched_shapes(trained, tmp_path):
    from data_pipeline import tokenizer as bpe
    from orchestrator.config import load_saved_config
    from trainers.checkpoint.store import CheckpointError
    from trainers.export import load_consolidated
    from trainers.models import build_gpt2

    # The runs' own model and vocabulary, half as wide: its input embedding is the first parameter that differs.
    run_model = load_saved_config((trained("ddp") / "config.yaml").read_text(), [], "config.yaml").model
    width, tokens = run_model.n_embd, len(bpe.load(str(trained("ddp") / "tokenizer")))
    other = build_gpt2(dataclasses.replace(run_model, n_embd=width // 2), vocab_size=tokens, eos_id=0)
    embedding = next(n for n, p in other.named_parameters() if p is other.get_input_embeddings().weight)
    rows = other.get_input_embeddings().num_embeddings
    mismatch = rf"{re.escape(embedding)}: checkpoint \[{rows}, {width}\] vs model \[{rows}, {width // 2}\]"
    for strategy in ("ddp", "zero3"):
        shards = trained(strategy) / "checkpoints" / "step_000020" / "shards"
        with pytest.raises(CheckpointError, match=mismatch):
            load_consolidated(other, str(shards), strategy)


# The tiny Qwen3-MoE preset in the runs' width, 6 steps: 4 layers (as many as its experts, so FSDP2 must tell the
# layers from the experts), grouped-query attention (2 query heads, 1 key/value head), attention dropout on.
MOE_RUN = [*(o for o in RUN if o != "model=llama3_tiny"), "model=qwen3_moe_tiny", "model.n_layer=4"]
MOE_RUN += ["train.max_steps=6"]


@pytest.fixture(scope="module")
def uncheckpointed_moe(tmp_path_factory):
    """strategy -> MOE_RUN's folder under it without activation checkpointing (trained the first time asked)."""
    return runs_per_strategy(tmp_path_factory.mktemp("moe"), *MOE_RUN)


@pytest.mark.parametrize(
    "strategy, model", [(s, m) for m in ("llama", "qwen3_moe_tiny") for s in ("ddp", "fsdp", "zero3")]
)  # under every kind, sharded ones included (where recomputation meets gathering)
def test_activation_checkpointing_saves_activations_not_math(trained, uncheckpointed_moe, strategy, model, tmp_path):
    run = [*(MOE_RUN if model == "qwen3_moe_tiny" else RUN), f"strategy={strategy}"]
    torchrun(*run, "model.activation_checkpointing=true", "run.id=ac", f"storage.root={tmp_path}")
    recomputed = by_step(tmp_path / "ac", "train/loss")
    # The Llama: the strategy's own 20-step run; the MoE: its run under ddp.
    stored = by_step(trained(strategy) if model == "llama" else uncheckpointed_moe("ddp"), "train/loss")
    assert sorted(recomputed) == sorted(stored)
    for step, loss in recomputed.items():
        assert loss == pytest.approx(stored[step], rel=1e-6), step
    if model == "qwen3_moe_tiny":  # the router's numbers reach the log under every strategy
        load = by_step(tmp_path / "ac", "train/expert_load_max_over_mean")
        assert sorted(load) == sorted(recomputed) == sorted(by_step(tmp_path / "ac", "train/moe_aux_loss"))
        assert all(1.0 <= value <= 4 / 2 for value in load.values())  # 4 experts, 2 per token
