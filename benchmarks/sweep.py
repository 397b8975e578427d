"""Sweeps: a 4-point grid as one `kiln sweep` (trials at once) against the same 4 runs one after another.

    .venv/bin/python -m benchmarks.sweep [--steps 100] [--eval-every 25] [--rounds 2] [--max-concurrent N]
                                         [--no-docs] [--keep]

The grid is `optim.lr=1e-3,3e-3 model.n_layer=1,2` over 1-worker runs of the tests' tiny model
(tests/helpers.py's TINY, train.max_steps=--steps, train.eval_every=--eval-every, cluster.num_workers=1,
tracker=none). Two measurements, side by side in one invocation, each the wall clock this script takes
(time.perf_counter around the subprocesses it starts; no figure a tool computes of itself):

1. Sweep: one `kiln sweep` of the grid (its own embedded Ray; as many trials at a time as the sweep's
   default fits on this machine's CPUs, 2 on 2 cores, or sweep.max_concurrent=--max-concurrent), from
   invoking it to its exit.
2. Sequential: the same 4 points (the overrides the sweep records for its trials) as 4 `kiln train` runs
   one after another, each with its own embedded Ray: the total from invoking the first to the last's exit.

Rounds alternate the order (sweep then sequential, sequential then sweep, ...), with no warm-up round;
each round writes to a fresh temporary storage.root, and every process shares one KILN_CACHE_DIR (the
caller's, or ~/.cache/kiln), in which the corpus is prepared once, untimed, before the first round. The
1-minute load average is noted before each measurement. Reports each round and the medians, the speed-up
(sequential / sweep), and the final val/loss of each point in both (the last val/loss row of each run's
metrics.jsonl): a trial and its sequential run have the same config, so they should match exactly; the
largest absolute difference is reported, not asserted.

Prints markdown tables and, unless --no-docs, writes them into docs/benchmarks.md as the section
"## Sweeps: concurrent trials against one after another (benchmarks/sweep.py)", replacing that whole
section (a reading of the numbers written there by hand goes with it: write the new one). Asserts nothing
about the numbers; exits non-zero, printing the tail of its output, if any command fails (a sweep with a
trial that did not succeed included). A round took 3 minutes on 2 cores at --steps 10 (the sweep about
70 s, the 4 runs about 110 s), a little more at the default 100; run it on an otherwise idle machine.
Leaves each command's log and results.json in a temporary folder it names (the run folders too, with
--keep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import base_env, paragraph, publish, seconds  # noqa: E402
from tests.helpers import BIN, TINY  # noqa: E402

HEADING = "## Sweeps: concurrent trials against one after another (benchmarks/sweep.py)"
GRID = ["optim.lr=1e-3,3e-3", "model.n_layer=1,2"]
TIMEOUT_S = 1800  # one command; at the defaults each takes a minute or two


class CommandFailed(Exception):
    """A command exited non-zero (or a sweep's trial did not succeed); the message ends with its output's tail."""


def kiln(name: str, args: list[str], env: dict, logs: Path) -> float:
    """Run `kiln ARGS` with its output in logs/NAME.log; the wall clock it took, or CommandFailed."""
    log = logs / f"{name}.log"
    with open(log, "w") as handle:
        handle.write(f"$ kiln {' '.join(args)}\n")
        handle.flush()
        started = time.perf_counter()
        try:
            result = subprocess.run(
                [str(BIN / "kiln"), *args],
                cwd=REPO,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"{name}: timed out after {TIMEOUT_S} s\n{tail(log)}") from None
        wall = time.perf_counter() - started
    if result.returncode != 0:
        raise CommandFailed(f"{name}: `kiln {args[0]}` exited {result.returncode}\n{tail(log)}")
    return wall


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def final_val_loss(root: Path, run_id: str) -> float | None:
    """The last val/loss the run logged in its metrics.jsonl (a torn line is skipped)."""
    value = None
    for line in (root / run_id / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val/loss" in row:
            value = row["val/loss"]
    return value


def sweep_status(root: Path, sweep_id: str, env: dict) -> dict:
    """`kiln sweep status SWEEP --json` (untimed)."""
    result = subprocess.run(
        [str(BIN / "kiln"), "sweep", "status", sweep_id, "--json", "--storage-root", str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise CommandFailed(f"kiln sweep status {sweep_id} exited {result.returncode}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)


def measure_sweep(tag: str, root: Path, base: list[str], points: list[list[str]], env: dict, logs: Path) -> dict:
    """One `kiln sweep` of the grid: its wall time and each point's final val/loss."""
    sweep_id = f"sweep-{tag}"
    load = os.getloadavg()[0]
    wall = kiln(sweep_id, ["sweep", *base, *GRID, f"sweep.id={sweep_id}", f"storage.root={root}"], env, logs)
    view = sweep_status(root, sweep_id, env)
    trials = view["trials"]
    if [t["overrides"] for t in trials] != points or {t["state"] for t in trials} != {"SUCCEEDED"}:
        states = ", ".join(f"{t['run_id']} {' '.join(t['overrides'])}: {t['state']}" for t in trials)
        raise CommandFailed(
            f"{sweep_id}: expected the points {points} all SUCCEEDED, got {states}\n{tail(logs / f'{sweep_id}.log')}"
        )
    return {
        "wall_s": wall,
        "load_before": load,
        "max_concurrent": view["max_concurrent"],
        "val_loss": [final_val_loss(root, t["run_id"]) for t in trials],
    }


def measure_sequential(tag: str, root: Path, base: list[str], points: list[list[str]], env: dict, logs: Path) -> dict:
    """The grid's points as `kiln train` runs one after another: the total wall time and each point's val/loss."""
    load = os.getloadavg()[0]
    each = []
    started = time.perf_counter()
    for n, point in enumerate(points, 1):
        run_id = f"seq-{tag}-{n}"
        each.append(kiln(run_id, ["train", *base, *point, f"run.id={run_id}", f"storage.root={root}"], env, logs))
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "each_s": each,
        "load_before": load,
        "val_loss": [final_val_loss(root, f"seq-{tag}-{n}") for n in range(1, len(points) + 1)],
    }


# Output.


def machine() -> str:
    import psutil

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"Ray {version('ray')}, torch {version('torch')}"
    )


def loss_diff(rounds: list[dict]) -> float | None:
    """The largest |sweep - sequential| final val/loss over every point of every round (None: one is missing)."""
    diffs = []
    for r in rounds:
        for a, b in zip(r["sweep"]["val_loss"], r["sequential"]["val_loss"], strict=True):
            if a is None or b is None:
                return None
            diffs.append(abs(a - b))
    return max(diffs)


def render(results: dict) -> str:
    rounds = results["rounds"]
    sweep = [r["sweep"]["wall_s"] for r in rounds]
    sequential = [r["sequential"]["wall_s"] for r in rounds]
    concurrent = sorted({r["sweep"]["max_concurrent"] for r in rounds})
    at_a_time = "/".join(str(c) for c in concurrent)
    speedup = statistics.median(sequential) / statistics.median(sweep)
    every, steps = results["eval_every"], results["steps"]
    evals = f"val/loss every {every} steps and at the end" if every < steps else "val/loss at the end"
    lines = [
        paragraph(
            f"A 4-point grid (`{' '.join(GRID)}`) of 1-worker runs of the tests' tiny model (64 wide, seq 64, "
            f"global batch 8, {results['steps']} steps, {evals}, tracker=none, "
            f"fp32) as one `kiln sweep` ({at_a_time} trials at a time{results['concurrency_note']}), against the "
            "same 4 points as `kiln train` runs one after another (each starting its own embedded Ray, as the "
            f"sweep does once). {len(rounds)} round(s), the order alternated (sweep first in odd rounds), no "
            "warm-up; each round in a fresh storage.root, the prepared corpus cached beforehand. Wall clock "
            "taken by this script from invoking the command(s) to the (last) exit."
        ),
        "",
        "| date | machine | command | wall time: median (each, in run order) | speed-up (sequential / sweep, "
        "medians) |",
        "|---|---|---|---|---|",
        f"| {results['date']} | {results['machine']} | `kiln sweep` ({at_a_time} at a time) | "
        f"{statistics.median(sweep):.1f} s ({seconds(sweep)}) | {speedup:.2f}x |",
        f"| {results['date']} | {results['machine']} | 4 x `kiln train`, one after another | "
        f"{statistics.median(sequential):.1f} s ({seconds(sequential)}) | - |",
        "",
        "| round | order | sweep | sequential (each run) | sequential / sweep | load (1 min) before sweep, "
        "sequential |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds, 1):
        s, q = r["sweep"], r["sequential"]
        lines.append(
            f"| {i} | {r['order']} | {s['wall_s']:.1f} s | {q['wall_s']:.1f} s ({seconds(q['each_s'])}) | "
            f"{q['wall_s'] / s['wall_s']:.2f}x | {s['load_before']:.1f}, {q['load_before']:.1f} |"
        )
    first = rounds[0]
    lines += [
        "",
        "| point | final val/loss, sweep (round 1) | final val/loss, sequential (round 1) |",
        "|---|---|---|",
    ]
    for point, a, b in zip(results["points"], first["sweep"]["val_loss"], first["sequential"]["val_loss"], strict=True):
        lines.append(f"| `{' '.join(point)}` | {loss(a)} | {loss(b)} |")
    diff = loss_diff(rounds)
    lines += [
        "",
        paragraph(
            "Largest |sweep - sequential| final val/loss over every point of every round: "
            + ("- (a run logged no val/loss)" if diff is None else f"{diff:.3g}")
            + f". Load average (1 minute): {results['load']}."
        ),
    ]
    return "\n".join(lines)


def loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


# Setup.


def plan_and_prepare(base: list[str], cache_dir: str) -> list[list[str]]:
    """The grid's points as the sweep records them; the corpus prepared (or found) in cache_dir. Untimed."""
    os.environ["KILN_CACHE_DIR"] = cache_dir
    from orchestrator.config import finalize
    from orchestrator.run.lifecycle import resolve_data
    from orchestrator.sweep.space import plan_sweep

    plan = plan_sweep([*base, *GRID])
    resolve_data(finalize(plan.base), log=lambda message: print(f"  {message}", flush=True))
    return plan.points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="train.max_steps of every run")
    parser.add_argument("--eval-every", type=int, default=25, help="train.eval_every of every run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of sweep + sequential, order alternated")
    parser.add_argument(
        "--max-concurrent", type=int, default=None, help="sweep.max_concurrent (default: the sweep's own default)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.eval_every < 1:
        parser.error("--rounds, --steps and --eval-every must be >= 1")

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-sweep-"))
    logs = work / "logs"
    logs.mkdir()
    cache_dir = os.path.abspath(os.path.expanduser(os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")))
    env = base_env(cache_dir)
    base = [
        *TINY,
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        "cluster.num_workers=1",
        "tracker=none",
    ]
    if args.max_concurrent is not None:
        base.append(f"sweep.max_concurrent={args.max_concurrent}")
    print(f"working in {work} (each command's output under {logs}); corpus cache {cache_dir}", flush=True)
    load_start = os.getloadavg()[0]
    print("planning the grid and preparing the corpus (untimed)", flush=True)
    points = plan_and_prepare(base, cache_dir)
    sweep_base = base
    base = [o for o in base if not o.startswith("sweep.")]  # `kiln train` takes no sweep.* settings
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "steps": args.steps,
        "eval_every": args.eval_every,
        "points": points,
        "concurrency_note": "" if args.max_concurrent is None else f", sweep.max_concurrent={args.max_concurrent}",
        "rounds": [],
    }
    try:
        for i in range(1, args.rounds + 1):
            root = work / f"round-{i}" / "runs"
            root.mkdir(parents=True)
            tag = f"r{i}"
            order = ("sweep", "sequential") if i % 2 == 1 else ("sequential", "sweep")
            result: dict = {"order": f"{order[0]}, then {order[1]}"}
            for mode in order:
                if mode == "sweep":
                    result[mode] = measure_sweep(tag, root, sweep_base, points, env, logs)
                else:
                    result[mode] = measure_sequential(tag, root, base, points, env, logs)
                m = result[mode]
                print(
                    f"round {i}: {mode:<10} {m['wall_s']:6.1f} s (load before {m['load_before']:.1f}); "
                    f"final val/loss {[loss(v) for v in m['val_loss']]}",
                    flush=True,
                )
            results["rounds"].append(result)
    except CommandFailed as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr, flush=True)
        print(f"(logs and run folders left in {work})", file=sys.stderr)
        sys.exit(1)
    results["load"] = f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    publish(work, results, render, HEADING, docs=not args.no_docs)
    if not args.keep:
        for i in range(1, args.rounds + 1):
            shutil.rmtree(work / f"round-{i}", ignore_errors=True)  # logs and results.json stay


if __name__ == "__main__":
    main()
