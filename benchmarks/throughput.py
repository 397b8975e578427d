"""Steady tokens/s of `kiln train` against a bare torch DDP loop and Hugging Face `Trainer`, and Kiln's data-wait share.

    .venv/bin/python benchmarks/throughput.py [--quick] [--rounds N] [--steps N] [--no-docs]

The three train the quickstart's model (GPT-2 from conf/model/gpt2_tiny.yaml) on the quickstart's prepared
corpus (prepared once, untimed, through Kiln; the baselines read the very same shard files) with the same
global batch and micro-batch, 2 processes of 1 thread each, fp32, DDP over gloo, the same AdamW settings
and warmup + cosine schedule:

- `kiln train experiment=quickstart` (embedded Ray, 2 workers x 1 CPU, strategy=ddp, its default
  train.log_every=1, tracker=none; evaluation and the checkpoint only at the last step);
- benchmarks/bare_ddp.py under `torchrun --nproc-per-node 2`;
- benchmarks/hf_trainer.py (`Trainer`, `use_cpu`, `ddp_backend="gloo"`) under the same torchrun.

Every number is wall clock from step timestamps, never a rate a tool computes of itself: rank 0's
time.time() at the end of each step (bare: after reading the loss back; HF: `on_step_end`; Kiln: the `time`
of the step's metrics.jsonl row, written by rank 0 right after the step's sync). Steady tokens/s = tokens of
the steps between two timestamps / the seconds between them, over the same step range for all three
(warm-up steps skipped; Kiln's last step, which also evaluates and saves, left out). The three run one after
another, in alternating order each round; medians over rounds. Kiln's data-wait share is the median over the
same steps of its logged perf/data_wait_frac.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, CpuSampler, base_env, machine, paragraph, publish, quickstart_overrides, today

HEADING = "## Throughput: `kiln train` against a bare torch loop and Hugging Face Trainer (`benchmarks/throughput.py`)"
BIN = Path(sys.executable).parent
SYSTEMS = ("kiln", "bare", "hf")
NAMES = {
    "kiln": "`kiln train` (Ray, 2 workers, ddp)",
    "bare": "bare torch DDP loop (torchrun)",
    "hf": "Hugging Face `Trainer` (torchrun)",
    "kiln_torchrun": "Kiln's loop without Ray (`torchrun -m orchestrator.torchrun`)",
    "kiln_every_step": "`kiln train` logging every step (train.log_every=1, the quickstart's default)",
}
# Kiln logs (syncs the ranks' metrics, writes a row, reports to Ray Train) every LOG_EVERY steps, as a run
# would; the bare loop and HF Trainer log nothing. The steady range starts and ends on logged steps.
LOG_EVERY = 10
# (steps per run, first step of the steady range, rounds)
FULL = (160, 30, 4)  # rounds on this 2-core machine differ by up to ~7%: four, for a steadier median
QUICK = (50, 15, 1)
GOALS = {"bare": 0.97, "hf": 1.0, "data_wait": 0.01}
# How each system's training processes are told from its other processes (its launcher, Ray's processes).
WORKER_MARKS = {
    "kiln": "ray::RayTrainWorker",
    "kiln_every_step": "ray::RayTrainWorker",
    "kiln_torchrun": "orchestrator.torchrun",
    "bare": "bare_ddp.py",
    "hf": "hf_trainer.py",
}


def is_worker(system: str, cmdline: str) -> bool:
    """Whether a process (by its command line) is one of system's training processes, not its launcher."""
    return WORKER_MARKS[system] in cmdline and "torch.distributed.run" not in cmdline


def plan(cache_dir: str, steps: int) -> dict:
    """The quickstart's composed config as one spec every system trains with; the corpus prepared. Untimed."""
    os.environ["KILN_CACHE_DIR"] = cache_dir
    from orchestrator.config import compose_config, finalize
    from orchestrator.run.lifecycle import resolve_data
    from trainers.models import padded_vocab

    cfg = finalize(compose_config(["experiment=quickstart"]))
    resolve_data(cfg, log=lambda message: print(f"  {message}", flush=True))
    manifest = json.loads((Path(cfg.data.path) / "manifest.json").read_text())
    model, optim, train = cfg.model, cfg.optim, cfg.train
    return {
        "dataset": cfg.data.path,
        "seq_len": manifest["seq_len"],
        "model": {
            "vocab_size": model.vocab_size or padded_vocab(manifest["vocab_size"]),
            "n_positions": model.n_positions,
            "n_embd": model.n_embd,
            "n_layer": model.n_layer,
            "n_head": model.n_head,
            "resid_pdrop": model.dropout,
            "embd_pdrop": model.dropout,
            "attn_pdrop": model.dropout,
            "bos_token_id": manifest.get("eos_id", 0),
            "eos_token_id": manifest.get("eos_id", 0),
            "use_cache": False,
        },
        "global_batch": train.global_batch,
        "micro_batch": train.micro_batch,
        "workers": cfg.cluster.num_workers,
        "threads": train.torch_threads,
        "seed": train.seed,
        "steps": steps,
        "lr": optim.lr,
        "betas": [optim.beta1, optim.beta2],
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
        "warmup_steps": optim.warmup_steps,
        "min_lr_ratio": optim.min_lr_ratio,
        "grad_clip": optim.grad_clip,
    }


def run_kiln(work: Path, tag: str, spec: dict, env: dict, ray: bool = True, log_every: int = LOG_EVERY) -> dict:
    """`kiln train experiment=quickstart` (ray=False: the same loop under torchrun, no Ray) for spec's steps,
    logging every log_every steps; its rows' step timestamps and logged data-wait shares."""
    root, steps = work / "runs", spec["steps"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec['workers']}"]
    launcher = [str(BIN / "kiln"), "train"] if ray else [*torchrun, "-m", "orchestrator.torchrun"]
    with open(work / f"{tag}.log", "w") as log:
        subprocess.run(
            [*launcher, *quickstart_overrides(tag, root, steps), f"train.log_every={log_every}"],
            check=True,
            cwd=REPO,
            env=env if ray else {**env, "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    config = (root / tag / "config.yaml").read_text()
    if spec["dataset"] not in config:
        raise RuntimeError(f"kiln run {tag} did not train on {spec['dataset']}")
    rows = [json.loads(line) for line in (root / tag / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "perf/step_time_s" in r]
    return {
        "step_end": {str(r["step"]): r["time"] for r in train},
        "data_wait": {str(r["step"]): r["perf/data_wait_frac"] for r in train},
        "own_tokens_per_s": {str(r["step"]): r["perf/tokens_per_s"] for r in train},
    }


def run_torchrun(work: Path, tag: str, script: str, spec_path: Path, env: dict, workers: int) -> dict:
    """A baseline script under torchrun (one thread per process); the step timestamps its rank 0 wrote."""
    out = work / f"{tag}.json"
    with open(work / f"{tag}.log", "w") as log:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(workers),
                str(REPO / "benchmarks" / script),
                str(spec_path),
                str(out),
            ],
            check=True,
            cwd=REPO,
            env={**env, "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return json.loads(out.read_text())


def run_system(system: str, work: Path, tag: str, spec: dict, spec_path: Path, env: dict) -> dict:
    """One run of system; its step timestamps (and Kiln's logged data-wait shares)."""
    if system == "kiln":
        return run_kiln(work, tag, spec, env)
    if system == "kiln_every_step":
        return run_kiln(work, tag, spec, env, log_every=1)
    if system == "kiln_torchrun":
        return run_kiln(work, tag, spec, env, ray=False)
    script = "bare_ddp.py" if system == "bare" else "hf_trainer.py"
    return run_torchrun(work, tag, script, spec_path, env, spec["workers"])


def steady_range(steps: int, first: int) -> tuple[int, int]:
    """The first and last step timed: logged steps (multiples of LOG_EVERY), from `first` (at most a third of
    the run) on, ending before the last step, which also evaluates and checkpoints before its row is written."""
    first = -(-min(first, steps // 3) // LOG_EVERY) * LOG_EVERY
    last = (steps - 1) // LOG_EVERY * LOG_EVERY
    if last <= first:
        raise ValueError(f"{steps} steps leave no logged steps to time between; run at least {4 * LOG_EVERY}")
    return first, last


def steady_rate(step_end: dict[str, float], first: int, last: int, tokens_per_step: int) -> float:
    """Tokens/s from the end of step `first` to the end of step `last` (wall clock)."""
    return (last - first) * tokens_per_step / (step_end[str(last)] - step_end[str(first)])


def measure(quick: bool, steps: int | None = None, rounds: int | None = None, without_ray: bool = False) -> dict:
    """Alternate the three systems (and, without_ray, Kiln's loop under torchrun) for some rounds; every run's
    steady tokens/s, their medians and ratios."""
    default_steps, first, default_rounds = QUICK if quick else FULL
    steps, rounds = steps or default_steps, rounds or default_rounds
    systems = (*SYSTEMS, *([] if quick else ["kiln_every_step"]), *(["kiln_torchrun"] if without_ray else []))
    first, last = steady_range(steps, first)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-throughput-"))
    cache_dir = os.path.abspath(os.path.expanduser(os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")))
    print(f"working in {work}; corpus cache {cache_dir}; preparing the corpus (untimed)", flush=True)
    spec = plan(cache_dir, steps)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = base_env(cache_dir)
    tokens_per_step = spec["global_batch"] * spec["seq_len"]
    results: dict = {
        "date": today(),
        "machine": machine(),
        "quick": quick,
        "spec": spec,
        "steady": [first, last],
        "log_every": LOG_EVERY,
        "tokens_per_step": tokens_per_step,
        "load_start": os.getloadavg()[0],
        "systems": list(systems),
        "rounds": [],
    }
    for number in range(rounds):
        order = systems if number % 2 == 0 else tuple(reversed(systems))
        done: dict = {"order": list(order), "load": {}, "tokens_per_s": {}}
        for system in order:
            tag = f"{system}-{number + 1}"
            done["load"][system] = os.getloadavg()[0]
            print(f"round {number + 1}: {NAMES[system]}, {steps} steps (load {done['load'][system]:.1f})", flush=True)
            with CpuSampler() as cpu:
                run = run_system(system, work, tag, spec, spec_path, env)
            if system == "kiln":
                steady = [s for s in run["data_wait"] if first < int(s) <= last]
                done["data_wait"] = statistics.median(run["data_wait"][s] for s in steady)
                done["kiln_own_tokens_per_s"] = statistics.median(run["own_tokens_per_s"][s] for s in steady)
            done["tokens_per_s"][system] = steady_rate(run["step_end"], first, last, tokens_per_step)
            window = run["step_end"][str(first)], run["step_end"][str(last)]
            done.setdefault("cpu", {})[system] = cpu.cores(*window, partial(is_worker, system))
            print(f"  {done['tokens_per_s'][system]:,.0f} tokens/s", flush=True)
        results["rounds"].append(done)
    results["load_end"] = os.getloadavg()[0]
    medians = {s: statistics.median(r["tokens_per_s"][s] for r in results["rounds"]) for s in systems}
    results["median_tokens_per_s"] = medians
    results["ratio"] = {s: medians["kiln"] / medians[s] for s in systems if s != "kiln"}
    results["data_wait_median"] = statistics.median(r["data_wait"] for r in results["rounds"])
    results["kiln_own_median"] = statistics.median(r["kiln_own_tokens_per_s"] for r in results["rounds"])
    results["work"] = str(work)
    return results


def render(results: dict) -> str:
    """The section: the three systems' tokens/s and ratios, Kiln's data-wait share, each round's order and load."""
    spec, (first, last) = results["spec"], results["steady"]
    when = f"{results['date']} | {results['machine']}"
    rounds = results["rounds"]
    medians, ratio = results["median_tokens_per_s"], results["ratio"]
    systems = results.get("systems", SYSTEMS)
    ratios = {"kiln": "-", **{s: f"{value:.3f}" for s, value in ratio.items()}}
    lines = [
        paragraph(
            f"The quickstart's GPT-2 ({spec['model']['n_layer']} layers, d={spec['model']['n_embd']}, "
            f"vocab {spec['model']['vocab_size']:,}), seq {spec['seq_len']}, global batch {spec['global_batch']} "
            f"(micro-batch {spec['micro_batch']}), {spec['workers']} processes x {spec['threads']} thread, fp32, "
            f"DDP over gloo, AdamW and warmup + cosine as conf/optim/adamw.yaml, on the same prepared shards: "
            f"`kiln train experiment=quickstart` (embedded Ray, train.log_every={results.get('log_every', 1)}, "
            "tracker=none), "
            f"benchmarks/bare_ddp.py and benchmarks/hf_trainer.py under `torchrun --nproc-per-node "
            f"{spec['workers']}`. {spec['steps']} steps per run; tokens/s is wall clock between rank 0's "
            f"time.time() at the end of step {first} and of step {last} (bare: after reading the loss back; "
            f"HF: `on_step_end`; Kiln: its metrics.jsonl row's `time`, written after the step's sync). "
            f"{len(rounds)} round(s), the order reversed every other round; medians over rounds."
        ),
        "",
        "| date | machine | system | tokens/s: median (each round) | Kiln / this |",
        "|---|---|---|---|---|",
    ]
    for system in systems:
        each = ", ".join(f"{r['tokens_per_s'][system]:,.0f}" for r in rounds)
        lines.append(f"| {when} | {NAMES[system]} | {medians[system]:,.0f} ({each}) | {ratios[system]} |")
    lines += [
        "",
        paragraph(
            f"Where the CPU went between steps {first} and {last} (psutil, every process on the machine sampled "
            "every 0.5 s; cores busy, medians over rounds): the system's training processes, and everything else "
            "(its launcher, Ray's control processes and Ray Train's helper actors, this benchmark's process left "
            "out). The machine has 2 cores. Tokens per core-second = the run's tokens/s / the cores its training "
            "processes got: how much each system's loop does with the CPU it was given."
        ),
        "",
        "| date | machine | system | training processes (cores) | everything else (cores) "
        "| tokens per training core-second | Kiln / this |",
        "|---|---|---|---|---|---|---|",
    ]
    if all("cpu" in r for r in rounds):
        per_core = {
            system: statistics.median(r["tokens_per_s"][system] / r["cpu"][system]["workers"] for r in rounds)
            for system in systems
        }
        for system in systems:
            busy = {kind: statistics.median(r["cpu"][system][kind] for r in rounds) for kind in ("workers", "others")}
            versus = "-" if system == "kiln" else f"{per_core['kiln'] / per_core[system]:.3f}"
            lines.append(
                f"| {when} | {NAMES[system]} | {busy['workers']:.2f} | {busy['others']:.2f} "
                f"| {per_core[system]:,.0f} | {versus} |"
            )
    waits = ", ".join(f"{r['data_wait']:.2%}" for r in rounds)
    lines += [
        "",
        "| date | machine | Kiln's data-wait share of step time: median (each round) |",
        "|---|---|---|",
        f"| {when} | {results['data_wait_median']:.2%} ({waits}) |",
        "",
        "| round | order | load (1 min) before each: " + ", ".join(systems) + " |",
        "|---|---|---|",
    ]
    for number, r in enumerate(rounds, 1):
        load = ", ".join(f"{r['load'][s]:.1f}" for s in systems)
        lines.append(f"| {number} | {', '.join(r['order'])} | {load} |")
    met = {
        "bare": ratio["bare"] >= GOALS["bare"],
        "hf": ratio["hf"] >= GOALS["hf"],
        "data_wait": results["data_wait_median"] < GOALS["data_wait"],
    }
    lines += [
        "",
        paragraph(
            f"Goals (issue 15): Kiln >= {GOALS['bare']} x bare ({'met' if met['bare'] else 'not met'}: "
            f"{ratio['bare']:.3f}), Kiln >= HF Trainer ({'met' if met['hf'] else 'not met'}: {ratio['hf']:.3f}), "
            f"data wait < {GOALS['data_wait']:.0%} of step time ({'met' if met['data_wait'] else 'not met'}: "
            f"{results['data_wait_median']:.2%}). Load average (1 minute): {results['load_start']:.1f} at the "
            f"start, {results['load_end']:.1f} at the end. For comparison only, Kiln's own perf/tokens_per_s "
            f"(its training window's time, which leaves out each step's sync and logging) had a median of "
            f"{results['kiln_own_median']:,.0f}."
        ),
        "",
        paragraph(
            "Data wait is the share of each rank's training time spent getting its next micro-batch: "
            "`next()` on the TokenStream (which reads ahead 2 batches on a thread) plus the task's host-side "
            "batch and the copy to the device, averaged over ranks, as perf/data_wait_frac logs it per step."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK[2]} round of {QUICK[0]} steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the three systems")
    parser.add_argument(
        "--without-ray", action="store_true", help="also time Kiln's loop under torchrun (where Ray's share goes)"
    )
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if (args.steps is not None and args.steps < 4 * LOG_EVERY) or (args.rounds is not None and args.rounds < 1):
        parser.error(f"--steps must be >= {4 * LOG_EVERY} and --rounds >= 1")
    started = time.perf_counter()
    results = measure(args.quick, args.steps, args.rounds, args.without_ray)
    publish(Path(results["work"]), results, render, HEADING, docs=not (args.no_docs or args.quick))
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
