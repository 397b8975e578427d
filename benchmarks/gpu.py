"""GPT-2 124M on one GPU: tokens/s and MFU per strategy, with and without model.compile; Llama 3 1B and 8B beside
torchtitan (benchmarks/gpu_llama.py); Llama 3 8B on 8 GPUs as FSDP, FSDP x TP, HSDP and HSDP x TP
(benchmarks/gpu_mesh.py, on a machine with 8 GPUs); the largest GPT-2 that trains with zero3_offload.

    .venv/bin/python benchmarks/gpu.py [--quick] [--no-docs]   # needs a CUDA GPU
    .venv/bin/python benchmarks/gpu.py --dry-run                # composes every run's config; trains nothing
    python3 benchmarks/gpu.py --no-docs --out DIR --budget-s 540 [--only cases|llama|ladder] [--ladder-from 1.5B]

A GPU lease is short and can end mid-run: --out rewrites DIR/results.json after every run (a failed run
carries the end of its log), and --budget-s gives every run only the time left and skips the runs that
would start with under a minute of it.

Every run is `torchrun --nproc-per-node 1 -m orchestrator.torchrun` (NCCL, no Ray: the loop alone) training
`model=gpt2_small` (GPT-2 124M from config, nothing downloaded) on the built-in corpus prepared at seq_len
1024 (once, untimed), bf16, the batch in CONFIG. Tokens/s is wall clock: the `time` stamps of the
metrics.jsonl rows rank 0 writes right after each logged step's sync (train.log_every=10, as a run would
log: a logged step reads its loss back and the GPU idles while the host logs it) over the steady steps
(compilation and warm-up skipped; the last step, which also evaluates and saves, left out). MFU is those
tokens/s x trainers/flops.py's FLOPs per token over the GPU's dense bf16 peak (trainers/flops.py's table).
Strategies: ddp (on one GPU: no communication), fsdp and zero3; model.compile is refused with zero3
(trainers/config/training.py COMPILE_STRATEGIES), so that row says so.

The Llama pairs (benchmarks/gpu_llama.py, after the cases): Llama 3 1B and 8B, each trained by Kiln and then by
torchtitan at the same shape, batch and sequence length; --llama-compile turns model.compile on for both.

The offload ladder trains GPT-2-shaped models of growing width and depth for a few steps each with
strategy=zero3_offload, micro-batch 1, activation checkpointing, and stops at the first that fails (out of
GPU or host memory, or over LADDER_TIMEOUT_S); the largest that finished is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import gpu_llama, gpu_mesh
from benchmarks.common import (
    NOT_RUN,
    Budget,
    base_env,
    compose,
    log_tail,
    machine,
    paragraph,
    prepare_corpus,
    publish,
    today,
    torchrun,
)

HEADING = "## GPU: GPT-2 124M and Llama 3 on one GPU (`benchmarks/gpu.py`)"
GOAL_MFU = 0.45
# What every run shares: GPT-2 124M at seq_len 1024, bf16, 16 sequences a micro-batch, 4 accumulated.
CONFIG = [
    "model=gpt2_small",
    "data=stdlib",
    "data.seq_len=1024",
    "strategy.precision=bf16",
    "train.micro_batch=16",
    "train.global_batch=64",
    "train.log_every=10",
    "train.eval_batches=2",
    "train.torch_threads=0",
    "optim.warmup_steps=5",
    "tracker=none",
]
PARTS = ("cases", "llama", "mesh", "ladder")  # in this order: the open-ended ladder last
STRATEGIES = ("ddp", "fsdp", "zero3")
CASES = [(strategy, compiled) for strategy in STRATEGIES for compiled in (False, True)]
# (steps per run, steps skipped as warm-up and compilation)
FULL = (60, 20)
QUICK = (30, 10)
# GPT-2 shapes (name, n_layer, n_head, n_embd), smallest first: the released sizes, then GPT-3's 2.7B and 6.7B shapes.
LADDER = [
    ("gpt2-medium 350M", 24, 16, 1024),
    ("gpt2-large 774M", 36, 20, 1280),
    ("gpt2-xl 1.5B", 48, 25, 1600),
    ("2.7B", 32, 32, 2560),
    ("6.7B", 32, 32, 4096),
    ("13B", 40, 40, 5120),
]
LADDER_STEPS = 3
TOKENS_PER_STEP = 64 * 1024  # train.global_batch x data.seq_len in CONFIG
LADDER_TIMEOUT_S = 1200


def case_overrides(strategy: str, compiled: bool, root: str, run_id: str, steps: int) -> list[str]:
    """The `kiln train` overrides of one strategy/compile run."""
    return [
        *CONFIG,
        f"strategy={strategy}",
        f"model.compile={str(compiled).lower()}",
        f"run.id={run_id}",
        f"storage.root={root}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
    ]


def ladder_overrides(n_layer: int, n_head: int, n_embd: int, root: str, run_id: str) -> list[str]:
    """The overrides of one offload-ladder run: a GPT-2 of this shape under zero3_offload, a few steps."""
    return [
        *CONFIG,
        "strategy=zero3_offload",
        f"model.n_layer={n_layer}",
        f"model.n_head={n_head}",
        f"model.n_embd={n_embd}",
        "model.activation_checkpointing=true",
        "train.micro_batch=1",
        "train.global_batch=1",
        f"run.id={run_id}",
        f"storage.root={root}",
        f"train.max_steps={LADDER_STEPS}",
        f"train.eval_every={LADDER_STEPS}",
        "train.eval_batches=1",
        f"train.checkpoint_every={10 * LADDER_STEPS}",  # only the last step's save: big models write slowly
    ]


def refusal(strategy: str, compiled: bool) -> str | None:
    """Why Kiln refuses a case's config (model.compile with zero3), else None."""
    return compose(case_overrides(strategy, compiled, "/tmp/kiln-bench-gpu", "dry", 10))


def steady(rows: list[dict], skip: int, tokens_per_step: int) -> dict:
    """Tokens/s between the row times of the first logged step from `skip` on and the last-but-one logged step
    (the last also evaluates and checkpoints before its row is written); peak memory; the last loss."""
    train = {r["step"]: r for r in rows if "perf/step_time_s" in r}
    logged = sorted(train)
    last = logged[-2]
    first = next((step for step in logged if step >= skip), last)
    first = first if first < last else logged[-3]
    seconds = train[last]["time"] - train[first]["time"]
    return {
        "tokens_per_s": (last - first) * tokens_per_step / seconds,
        "steps": [first, last],
        "peak_mem_mb": max(r["perf/peak_mem_mb"] for r in train.values()),
        "loss": train[max(train)]["train/loss"],
    }


def flops_and_peak(run_dir: Path) -> tuple[float, float | None, str]:
    """FLOPs per token of GPT-2 124M at seq_len 1024 (trainers/flops.py), this GPU's bf16 peak and its name."""
    import torch
    from transformers import GPT2LMHeadModel

    from orchestrator.config import load_saved_config
    from trainers.flops import flops_per_token, peak_flops
    from trainers.models import gpt2_config

    cfg = load_saved_config((run_dir / "config.yaml").read_text(), [], str(run_dir))
    with torch.device("meta"):
        model = GPT2LMHeadModel(gpt2_config(cfg.model, cfg.model.vocab_size or 50304, 0))
    params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    name = torch.cuda.get_device_name(0)
    return flops_per_token(params, cfg.model.n_layer, cfg.model.n_embd, cfg.data.seq_len), peak_flops(name), name


def measure(
    quick: bool,
    budget: Budget | None = None,
    parts: tuple[str, ...] = PARTS,
    ladder_from: str | None = None,
    save: Callable[[dict], None] = lambda results: None,
    llama_compile: bool = False,
) -> dict:
    """Every strategy with and without model.compile, the Llama pairs (benchmarks/gpu_llama.py), then the
    zero3_offload ladder (quick: two rungs)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
            "run it on a GPU machine, or check its configs here with --dry-run"
        )
    budget = budget or Budget(None)
    steps, skip = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-gpu-"))
    cache_dir = os.path.abspath(os.path.expanduser(os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")))
    print(f"working in {work}", flush=True)
    if {"cases", "ladder"} & set(parts):
        print("preparing the corpus at seq_len 1024 (untimed)", flush=True)
        prepare_corpus(cache_dir, CONFIG)
    env = base_env(cache_dir)
    log_every = int(next(o for o in CONFIG if o.startswith("train.log_every=")).split("=")[1])
    results: dict = {
        "date": today(),
        "machine": machine(),
        "quick": quick,
        "steps": steps,
        "log_every": log_every,
        "cases": [],
    }
    if "cases" in parts:
        for strategy, compiled in CASES:
            results["cases"].append(run_case(strategy, compiled, work, env, (steps, skip), budget, results))
            save(results)
    if "llama" in parts:
        results["llama"] = []
        gpu_llama.measure(work, env, cache_dir, budget, results["llama"], lambda: save(results), quick, llama_compile)
    if "mesh" in parts:
        results["mesh"] = []
        gpu_mesh.measure(work, env, budget, results["mesh"], lambda: save(results), llama_compile)
    shapes = LADDER[:2] if quick else LADDER
    if ladder_from:
        shapes = LADDER[next(i for i, shape in enumerate(LADDER) if ladder_from in shape[0]) :]
    if "ladder" in parts:
        results["ladder"] = []
        ladder(work, env, shapes, budget, results["ladder"], lambda: save(results))
    return results


def run_case(
    strategy: str, compiled: bool, work: Path, env: dict, steps: tuple[int, int], budget: Budget, results: dict
) -> dict:
    """One strategy/compile run (steps: run, skipped): tokens/s, MFU, peak memory, last loss; or why not."""
    case: dict = {"strategy": strategy, "compile": compiled}
    refused = refusal(strategy, compiled)
    if refused:
        return {**case, "refused": refused}
    if not budget.allows_a_run():
        return {**case, "failed": NOT_RUN}
    run_id = f"{strategy}-{'compiled' if compiled else 'eager'}"
    print(f"{run_id}: {steps[0]} steps", flush=True)
    started = time.time()
    log = work / f"{run_id}.log"
    code = torchrun(case_overrides(strategy, compiled, str(work), run_id, steps[0]), env, log, budget.left())
    case["wall_s"] = time.time() - started
    if code != 0:
        return {**case, "failed": "timed out" if code == -1 else f"exit code {code}", "log_tail": log_tail(log)}
    rows = [json.loads(line) for line in (work / run_id / "metrics.jsonl").read_text().splitlines()]
    case.update(steady(rows, steps[1], TOKENS_PER_STEP))
    flops, peak, gpu = flops_and_peak(work / run_id)
    results.update(flops_per_token=flops, peak_flops=peak, gpu=gpu)
    case["mfu"] = case["tokens_per_s"] * flops / peak if peak else None
    return case


def ladder(
    work: Path,
    env: dict,
    shapes: list[tuple[str, int, int, int]],
    budget: Budget,
    done: list[dict],
    saved: Callable[[], None],
) -> None:
    """Train each shape under zero3_offload for a few steps, smallest first, until one fails; rungs go to `done`."""
    for index, (name, n_layer, n_head, n_embd) in enumerate(shapes):
        if not budget.allows_a_run():
            for later, *shape in shapes[index:]:
                print(f"zero3_offload {later}: not run, the time budget was spent", flush=True)
                done.append({"name": later, "shape": shape, "ok": False, "failed": NOT_RUN, "not_run": True})
            saved()
            return
        run_id = f"offload-{n_layer}x{n_embd}"
        print(f"zero3_offload {name}: {LADDER_STEPS} steps", flush=True)
        started = time.time()
        left = budget.left()
        log = work / f"{run_id}.log"
        timeout = LADDER_TIMEOUT_S if left is None else min(left, LADDER_TIMEOUT_S)
        code = torchrun(ladder_overrides(n_layer, n_head, n_embd, str(work), run_id), env, log, timeout)
        rung = {"name": name, "shape": [n_layer, n_head, n_embd], "wall_s": time.time() - started, "ok": code == 0}
        if code == 0:
            rows = [json.loads(line) for line in (work / run_id / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in rows if "perf/step_time_s" in r]
            rung["peak_mem_mb"] = max(r["perf/peak_mem_mb"] for r in train)
            rung["last_step_s"] = train[-2]["time"] - train[-3]["time"] if len(train) >= 3 else None
        else:
            rung["failed"] = "timed out" if code == -1 else f"exit code {code}"
            rung["log_tail"] = log_tail(log)
        done.append(rung)
        saved()
        shutil.rmtree(work / run_id, ignore_errors=True)  # a big model's checkpoint would fill the next rung's disk
        if code != 0:
            return


def render(results: dict) -> str:
    """The section's body: the strategy x compile table, the goal line and the offload ladder."""
    stamp = f"{results['date']}, {results['machine']}"
    lines = [
        paragraph(
            f"GPT-2 124M (conf/model/gpt2_small.yaml), seq_len 1024, bf16, micro-batch 16 x 4 accumulated, one "
            f"{results.get('gpu', 'GPU')}, torchrun with NCCL; {results['steps']} steps a run, train.log_every="
            f"{results.get('log_every', 1)}, tokens/s by wall clock between logged rows over the steady steps. "
            f"Measured {stamp}." + (" Quick run: not for publishing." if results["quick"] else "")
        ),
        "",
        "| strategy | model.compile | tokens/s | MFU | peak memory (MB) | loss at last step |",
        "|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        head = f"| {case['strategy']} | {'yes' if case['compile'] else 'no'} |"
        if "refused" in case or "failed" in case:
            lines.append(f"{head} {case.get('refused') or case.get('failed')} | | | |")
            continue
        mfu = f"{case['mfu']:.1%}" if case.get("mfu") is not None else "-"
        lines.append(f"{head} {case['tokens_per_s']:,.0f} | {mfu} | {case['peak_mem_mb']:,.0f} | {case['loss']:.4f} |")
    measured = [c for c in results["cases"] if c.get("mfu") is not None]
    if measured:
        best = max(measured, key=lambda c: c["mfu"])
        verdict = "meets" if best["mfu"] >= GOAL_MFU else "misses"
        compiled = " with model.compile" if best["compile"] else ""
        goal = f"{verdict} the {GOAL_MFU:.0%} goal"
        lines += ["", f"Best: {best['strategy']}{compiled} at {best['mfu']:.1%} MFU ({goal})."]
    lines += [
        "",
        "| zero3_offload model | n_layer x n_head x n_embd | trained | peak GPU memory (MB) |",
        "|---|---|---|---|",
    ]
    for rung in results.get("ladder", []):
        shape = " x ".join(str(v) for v in rung["shape"])
        outcome = "yes" if rung["ok"] else rung["failed"]
        peak = f"{rung['peak_mem_mb']:,.0f}" if rung["ok"] else ""
        lines.append(f"| {rung['name']} | {shape} | {outcome} | {peak} |")
    trained = [r for r in results.get("ladder", []) if r["ok"]]
    untried = [r["name"] for r in results.get("ladder", []) if r.get("not_run")]
    if trained:
        largest = f"Largest GPT-2 shape trained with zero3_offload on one GPU: {trained[-1]['name']}"
        lines += ["", largest + (f" ({', '.join(untried)} not tried)." if untried else ".")]
    if results.get("llama"):
        lines += ["", *gpu_llama.render(results["llama"])]
    if results.get("mesh"):
        lines += ["", *gpu_mesh.render(results["mesh"])]
    return "\n".join(lines)


def dry_run() -> int:
    """Compose every run's config as `orchestrator.torchrun` would, train nothing; 1 if one fails unexpectedly."""
    bad = 0
    for strategy, compiled in CASES:
        problem = refusal(strategy, compiled)
        expected = strategy == "zero3" and compiled
        print(f"{strategy} compile={compiled}: {'refused: ' + problem if problem else 'composes'}")
        bad += bool(problem) != expected
    for name, n_layer, n_head, n_embd in LADDER:
        problem = compose(ladder_overrides(n_layer, n_head, n_embd, "/tmp/kiln-bench-gpu", "dry"))
        print(f"zero3_offload {name}: {problem or 'composes'}")
        bad += bool(problem)
    bad += gpu_llama.dry_run()
    bad += gpu_mesh.dry_run()
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and two ladder rungs (a smoke run)")
    parser.add_argument("--no-docs", action="store_true", help="print the tables, leave docs/benchmarks.md alone")
    parser.add_argument("--dry-run", action="store_true", help="compose every run's config, train nothing")
    parser.add_argument("--out", type=Path, help="rewrite OUT/results.json after every run")
    parser.add_argument("--budget-s", type=float, help="seconds all runs may take together")
    parser.add_argument(
        "--only", choices=PARTS, help="the strategy table, the Llama pairs, the mesh rows or the ladder alone"
    )
    parser.add_argument("--ladder-from", help="start the ladder at the rung whose name contains this (e.g. 1.5B)")
    parser.add_argument("--llama-compile", action="store_true", help="the Llama pairs with model.compile (both)")
    args = parser.parse_args()
    if args.dry_run:
        sys.exit(dry_run())
    out = args.out or Path(tempfile.mkdtemp(prefix="kiln-bench-gpu-out-"))
    out.mkdir(parents=True, exist_ok=True)

    def save(partial: dict) -> None:
        (out / "results.json").write_text(json.dumps(partial, indent=2))

    parts = (args.only,) if args.only else PARTS
    results = measure(args.quick, Budget(args.budget_s), parts, args.ladder_from, save, args.llama_compile)
    publish(out, results, render, HEADING, not args.no_docs)


if __name__ == "__main__":
    main()
