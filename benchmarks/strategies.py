"""Tokens/s and memory per strategy on this machine, and Kiln's overhead against a bare DDP loop.

    .venv/bin/python benchmarks/strategies.py [--steps 60] [--strategies ddp,fsdp,...]

Every strategy runs `kiln train experiment=quickstart strategy=S` on an embedded Ray with 2 CPU workers;
numbers come from the run's metrics.jsonl (median of steady-state steps, the first fifth skipped).
Kiln against a bare torch loop and Hugging Face Trainer is benchmarks/throughput.py. Prints a markdown
table for docs/benchmarks.md; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import quickstart_overrides  # noqa: E402

BIN = Path(sys.executable).parent
STRATEGIES = ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload"]


def kiln_run(root: str, strategy: str, steps: int, overrides: list[str]) -> dict:
    """Train the quickstart model with one strategy; summarise its steady state."""
    subprocess.run(
        [str(BIN / "kiln"), "train", *quickstart_overrides(strategy, root, steps), f"strategy={strategy}", *overrides],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    rows = [json.loads(line) for line in (Path(root) / strategy / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "perf/tokens_per_s" in r]
    steady = train[len(train) // 5 :]
    last = train[-1]
    return {
        "strategy": strategy,
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
        "peak_mem_mb": last["perf/peak_mem_mb"],
        "held_mb": (last["perf/param_bytes"] + last["perf/optim_bytes"] + last["perf/master_bytes"]) / 2**20,
        "final_loss": last["train/loss"],
        "mfu": statistics.median(r["perf/mfu"] for r in steady) if "perf/mfu" in last else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "overrides", nargs="*", help="extra `kiln train` overrides, e.g. model=gpt2_small cluster.use_gpu=true"
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory() as root:
        results = [kiln_run(root, s, args.steps, args.overrides) for s in args.strategies.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.steps} steps, 2 Ray workers x 1 CPU, fp32\n")
    print("| strategy | tokens/s | MFU | peak memory per worker (MB) | held by rank 0 (MB) | loss at last step |")
    print("|---|---|---|---|---|---|")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"| {r['strategy']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_mb']:,.0f} | {r['held_mb']:.2f} | "
            f"{r['final_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
