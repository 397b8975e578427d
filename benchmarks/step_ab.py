"""Kiln's training step against the bare loop's, side by side in the same two processes.

    .venv/bin/python benchmarks/step_ab.py [--quick] [--rounds N] [--no-docs]

benchmarks/throughput.py compares whole runs, where everything else a system runs (Ray's processes, its
startup, the machine's state) counts too. This one asks only whether Kiln's loop itself is slower: under
one `torchrun --nproc-per-node 2`, each process builds Kiln's Trainer for the quickstart (world 2, ddp)
and the bare loop of benchmarks/bare_ddp.py (same GPT-2 shape, AdamW settings and schedule), then
alternates blocks of BLOCK steps of each, in alternating order: Kiln's loop as `trainers.loop.run`
drives it (the watchdog's phases, `Trainer.train_step`, a sync of the ranks' metrics and their
`metrics_for` every LOG_EVERY steps), and the bare step (forward, backward, clip, AdamW, schedule, zero
grads, loss read back). Time is rank 0's wall clock per block; medians over blocks.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, base_env, machine, paragraph, rounds_cli, today

HEADING = "## Kiln's step against the bare step, in the same processes (`benchmarks/step_ab.py`)"
BLOCK = 20
LOG_EVERY = 10  # as benchmarks/throughput.py times Kiln
FULL, QUICK = 8, 1  # rounds


class WorkerContext:
    """The WorkerContext of a torchrun process: rank and world from the process group, nothing reported."""

    def __init__(self, rank: int, world_size: int):
        self.rank = self.local_rank = rank
        self.world_size = world_size

    def report(self, metrics, step) -> None:
        """Nothing: this benchmark keeps its own times."""

    def should_stop(self) -> bool:
        """Never."""
        return False


def worker(rounds: int, spec_path: str, root: str, out: str) -> None:
    """One torchrun process: both loops on this rank, alternating blocks; rank 0 writes ms/step per block."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from benchmarks.bare_ddp import build, micro_batch, train_sequences, train_step
    from orchestrator.config import compose_config, finalize
    from orchestrator.run.lifecycle import resolve_data
    from trainers.loop import Trainer
    from trainers.watchdog import StepWatchdog

    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(spec["threads"])
    cfg = finalize(
        compose_config(["experiment=quickstart", f"storage.root={root}", "tracker=none", "train.max_steps=1000000"])
    )
    resolve_data(cfg, log=lambda message: None)
    trainer = Trainer(cfg, WorkerContext(rank, world))
    watchdog = StepWatchdog(cfg.train.step_timeout_s, rank, on_hang=lambda reason: None).start()

    torch.manual_seed(spec["seed"])
    sequences = train_sequences(spec["dataset"])
    order = np.random.default_rng(spec["seed"]).permutation(len(sequences))
    model, optimizer, scheduler = build(spec)
    micro = spec["micro_batch"]
    if spec["global_batch"] != micro * world:
        raise ValueError("step_ab times one micro-batch per rank per step (the quickstart's shape)")
    bare_steps = [0]

    def bare_step() -> None:
        batch = micro_batch(sequences, order, bare_steps[0] * world + rank, micro)
        bare_steps[0] += 1
        train_step(model, optimizer, scheduler, [batch], spec["grad_clip"])

    def kiln_step() -> None:
        with watchdog.phase(trainer.step, "train step"):
            trainer.train_step()
        if trainer.step % LOG_EVERY == 0:
            with watchdog.phase(trainer.step, "sync"):
                summary = trainer.sync(False)
            trainer.metrics_for(summary)
            trainer.window.open()

    loops = {"kiln": kiln_step, "bare": bare_step}
    trainer.window.open()
    for step in loops.values():  # warm-up, untimed
        for _ in range(BLOCK):
            step()
    blocks: dict[str, list[float]] = {name: [] for name in loops}
    for number in range(rounds):
        for name in list(loops) if number % 2 == 0 else list(reversed(loops)):
            dist.barrier()
            started = time.perf_counter()
            for _ in range(BLOCK):
                loops[name]()
            blocks[name].append((time.perf_counter() - started) / BLOCK)
    watchdog.stop()
    trainer.batches.close()
    if rank == 0:
        Path(out).write_text(json.dumps(blocks))
    dist.destroy_process_group()


def measure(quick: bool, rounds: int | None = None) -> dict:
    """Both loops under one torchrun of 2 processes; seconds per step of every block, medians and the ratio."""
    from benchmarks.throughput import plan

    rounds = rounds or (QUICK if quick else FULL)
    cache_dir = os.path.abspath(os.path.expanduser(os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")))
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-step-ab-"))
    spec = plan(cache_dir, steps=1)
    (work / "spec.json").write_text(json.dumps(spec))
    out = work / "blocks.json"
    with open(work / "torchrun.log", "w") as log:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={spec['workers']}",
                str(Path(__file__).resolve()),
                "--worker",
                str(rounds),
                str(work / "spec.json"),
                str(work / "runs"),
                str(out),
            ],
            check=True,
            cwd=REPO,
            env={**base_env(cache_dir), "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    blocks = json.loads(out.read_text())
    medians = {name: statistics.median(times) for name, times in blocks.items()}
    return {
        "date": today(),
        "machine": machine(),
        "quick": quick,
        "spec": spec,
        "rounds": rounds,
        "block": BLOCK,
        "blocks": blocks,
        "median_s": medians,
        "ratio": medians["bare"] / medians["kiln"],
        "work": str(work),
    }


def render(results: dict) -> str:
    """The section: ms per step of each loop (median and every block) and Kiln's speed as a share of bare's."""
    spec = results["spec"]
    tokens = spec["global_batch"] * spec["seq_len"]
    lines = [
        paragraph(
            f"The quickstart's GPT-2, seq {spec['seq_len']}, global batch {spec['global_batch']} (micro-batch "
            f"{spec['micro_batch']} on each of {spec['workers']} processes x {spec['threads']} thread), fp32, DDP "
            f"over gloo. Both loops live in the same two torchrun processes and alternate blocks of "
            f"{results['block']} steps, {results['rounds']} blocks each; Kiln syncs and computes its logged "
            f"metrics every {LOG_EVERY} steps as a run does. Ratio = bare time / Kiln time (1.0: as fast)."
        ),
        "",
        "| date | machine | loop | ms/step: median (each block) | tokens/s | Kiln / bare |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("kiln", "bare"):
        each = ", ".join(f"{value * 1000:.1f}" for value in results["blocks"][name])
        median = results["median_s"][name]
        ratio = f"{results['ratio']:.3f}" if name == "kiln" else "-"
        lines.append(
            f"| {results['date']} | {results['machine']} | {name} | {median * 1000:.1f} ({each}) "
            f"| {tokens / median:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), *sys.argv[3:6])
        return
    rounds_cli(__doc__, measure, render, HEADING, f"{QUICK} round (a smoke run)")


if __name__ == "__main__":
    main()
