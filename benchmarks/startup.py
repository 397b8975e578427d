"""Command to first step: `kiln train` against `torchrun` and a plain Ray Train TorchTrainer of the same loop.

    .venv/bin/python benchmarks/startup.py [--quick] [--rounds 3] [--no-docs]

Three commands train the quickstart's model (GPT-2 of conf/model/gpt2_tiny.yaml) on the same already
prepared corpus (the quickstart's stdlib corpus, prepared once beforehand, untimed), 2 processes x 1 CPU
thread, DDP over gloo:

1. `kiln train experiment=quickstart tracker=none` (its embedded Ray, 2 workers);
2. `torchrun --standalone --nproc-per-node 2 benchmarks/bare_ddp.py` (no Ray, no Kiln);
3. `benchmarks/ray_train_plain.py`: the same bare loop in a plain Ray Train TorchTrainer (ray.init(),
   ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).

Each is timed by wall clock on this machine, taken by this script: from time.time() just before the
command is started to the end of its first training step, which is the `time` of Kiln's first train/loss
row in metrics.jsonl (time.time() in rank 0 after step 1's window is gathered) and, for the bare loops,
the time.time() rank 0 writes to a file after its first step. One untimed warm-up of each, then rounds
of the three in turn (the order rotates), medians reported. Kiln's run is split into phases by the
moments it leaves behind: its output lines (stamped as they arrive), its `launched` and `started`
events, the kernel's creation time of its worker processes, and the validation row of step 0. Alone,
once per round: the imports of `kiln train`'s driver and worker modules, and ray.init() + shutdown.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import base_env, machine, paragraph, rounds_cli, today  # noqa: E402
from benchmarks.throughput import plan  # noqa: E402

HEADING = "## Startup: command to first step (benchmarks/startup.py)"
BIN = Path(sys.executable).parent
KILN_ARGS = ["experiment=quickstart", "tracker=none", "train.max_steps=2"]
BARE_STEPS = 2
COMMANDS = ("kiln", "torchrun", "ray_train")
GOAL_S = 5.0  # issue 15: kiln train's first step at most this much after plain Ray Train's
RAY_SESSIONS = Path("/tmp/ray")  # Ray's default temp dir: where its sessions keep their logs
TIMEOUT_S = 600


class Stamped:
    """A command whose output lines are written to a log, each with the time.time() it arrived at."""

    def __init__(self, argv: list[str], env: dict, log: Path):
        self.lines: list[tuple[float, str]] = []
        self.argv = argv
        self.log = log
        with open(log, "a") as handle:
            handle.write(f"\n$ {' '.join(argv)}\n")
        self.invoked = time.time()
        self.process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with open(self.log, "a") as handle:
            for line in self.process.stdout:
                moment = time.time()
                self.lines.append((moment, line))
                handle.write(f"{moment - self.invoked:8.3f} {line}")

    def wait(self) -> None:
        """Wait for the command; raise with its output's tail if it failed."""
        try:
            code = self.process.wait(timeout=TIMEOUT_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self._reader.join(timeout=10)
        if code != 0:
            raise RuntimeError(f"{self.argv[0]} exited {code}:\n{self.log.read_text()[-3000:]}")

    def first_line(self, text: str) -> float | None:
        """Seconds from invocation to the first output line containing text."""
        return next((moment - self.invoked for moment, line in self.lines if text in line), None)


def ray_train_moments(run_name: str, invoked: float) -> dict:
    """Seconds from invocation to Ray Train's milestones, from the `timestamp_ns` of its own log lines
    (moments, not durations) in the newest Ray session that holds a run of this name."""
    for session in sorted(RAY_SESSIONS.glob("session_2*"), reverse=True)[:5]:
        entries = [e for e in log_entries(session / "logs" / "train") if e.get("run_name") == run_name]
        if entries:
            return {
                "controller_up_s": moment(entries, "Requesting resources", invoked, min),
                "group_starting_s": moment(entries, "Attempting to start training worker group", invoked, min),
                "process_group_s": moment(entries, "Setting up process group", invoked, max),
                "train_fn_s": moment(entries, "Launching training function", invoked, max),
            }
    return {}


def log_entries(folder: Path) -> list[dict]:
    """The JSON lines of Ray Train's system logs in a session's logs/train folder."""
    entries = []
    for log in folder.glob("ray-train-sys-*.log"):
        for line in log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
    return entries


def moment(entries: list[dict], text: str, invoked: float, pick) -> float | None:
    """Seconds from invocation to the first (pick=min) or last (max) log line containing text."""
    found = [e["timestamp_ns"] / 1e9 - invoked for e in entries if text in e.get("message", "")]
    return pick(found) if found else None


def run_kiln(work: Path, name: str, env: dict, log: Path) -> dict:
    """`kiln train` of the quickstart: invoke -> first step, and the phases on the way."""
    from benchmarks.cluster import FirstStep, metrics_rows, run_events

    root = work / "runs"
    url = str(root / name)
    command = Stamped([str(BIN / "kiln"), "train", *KILN_ARGS, f"run.id={name}", f"storage.root={root}"], env, log)
    watch = FirstStep(url, command.process, log)
    while command.process.poll() is None:  # the kernel's creation times of driver and ranks, while they live
        if watch.ranks_created is None or watch.driver_created is None:
            with contextlib.suppress(FileNotFoundError, RuntimeError):  # not yet written; a failure: wait()
                watch()
        time.sleep(0.2)
    command.wait()
    rows = metrics_rows(url)
    invoked = command.invoked
    first_train = next(r for r in rows if "train/loss" in r)
    val0 = next((r for r in rows if r["step"] == 0 and any(k.startswith("val/") for k in r)), None)
    ranks = [t for t in watch.ranks_created or [] if t is not None]
    return {
        "first_step_s": first_train["time"] - invoked,
        "driver_created_s": watch.driver_created - invoked if watch.driver_created else None,
        "first_output_s": command.first_line("data:"),
        "launched_s": run_events(url, "launched")[0]["time"] - invoked,
        **ray_train_moments(name, invoked),
        "workers_created_s": max(ranks) - invoked if ranks else None,
        "started_s": run_events(url, "started")[0]["time"] - invoked,
        "val_step0_s": val0["time"] - invoked if val0 else None,
    }


def run_bare(kind: str, work: Path, name: str, spec: Path, env: dict, log: Path) -> dict:
    """torchrun or plain Ray Train of benchmarks/bare_ddp.py: invoke -> the end of its first step."""
    out = work / f"{name}.json"
    args = [str(spec), str(out)]
    if kind == "torchrun":
        argv = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(REPO / "benchmarks/bare_ddp.py")]
    else:
        argv = [sys.executable, str(REPO / "benchmarks" / "ray_train_plain.py")]
    command = Stamped([*argv, *args], {**env, "OMP_NUM_THREADS": "1"}, log)
    command.wait()
    moments = ray_train_moments(name, command.invoked) if kind == "ray_train" else {}
    return {"first_step_s": json.loads(out.read_text())["step_end"]["1"] - command.invoked, **moments}


def wall(argv: list[str], env: dict) -> float:
    """Seconds a short command takes, start to exit."""
    started = time.time()
    subprocess.run(argv, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - started


def components(env: dict) -> dict:
    """Pieces alone: Python itself, the driver's and a worker's imports, ray.init() + ray.shutdown()."""
    python = [sys.executable, "-c"]
    return {
        "python_s": wall([*python, "pass"], env),
        "driver_imports_s": wall(
            [
                *python,
                "import orchestrator.cli, orchestrator.config, orchestrator.run.lifecycle,"
                " orchestrator.launch.ray_train",
            ],
            env,
        ),
        "worker_imports_s": wall([*python, "import orchestrator.launch.ray_worker, trainers.loop"], env),
        "ray_init_s": wall([*python, "import ray; ray.init(); ray.shutdown()"], env),
    }


def measure(quick: bool, rounds: int | None = None) -> dict:
    """Warm-up, then rounds of the three commands in turn; every time and phase of every round."""
    rounds = rounds or (1 if quick else 3)
    cache_dir = os.path.abspath(os.path.expanduser(os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")))
    env = {**base_env(cache_dir), "PYTHONUNBUFFERED": "1"}
    import benchmarks.cluster as cluster

    cluster.CLOCK_SKEW[0] = cluster.measure_clock_skew()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-startup-"))
    log = work / "commands.log"
    print(f"working in {work}; corpus cache {cache_dir}; preparing the corpus (untimed)", flush=True)
    spec = work / "spec.json"
    spec.write_text(json.dumps(plan(cache_dir, BARE_STEPS)))
    load_start = os.getloadavg()[0]

    def one(kind: str, name: str) -> dict:
        if kind == "kiln":
            return run_kiln(work, name, env, log)
        return run_bare(kind, work, name, spec, env, log)

    for kind in COMMANDS:  # warm-up: page cache, bytecode, Ray's first session
        one(kind, f"warmup-{kind}")
    results: dict = {"date": today(), "machine": machine(), "rounds": [], "components": []}
    for i in range(rounds):
        order = COMMANDS[i % 3 :] + COMMANDS[: i % 3]
        result: dict = {kind: one(kind, f"r{i}-{kind}") for kind in order}
        result["order"] = ", ".join(order)
        results["rounds"].append(result)
        results["components"].append(components(env))
        print(f"round {i + 1}: " + ", ".join(f"{k} {result[k]['first_step_s']:.1f} s" for k in COMMANDS), flush=True)
    results["load"] = f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    results["work"] = str(work)
    return results


def median(results: dict, where: str, key: str) -> float | None:
    values = [r[key] for r in results[where] if r.get(key) is not None] if where == "components" else []
    if where != "components":
        values = [r[where][key] for r in results["rounds"] if r[where].get(key) is not None]
    return statistics.median(values) if values else None


PHASES = [
    ("driver_created_s", "driver process created"),
    ("first_output_s", "driver imported, config composed, corpus found (its first output line)"),
    ("launched_s", "`launched` event: data checked, run registered, tokenizer saved; ray.init() next"),
    ("controller_up_s", "Ray Train's controller up (it asks for the workers' resources)"),
    ("group_starting_s", "the controller starts the worker group"),
    ("workers_created_s", "the later of the two rank processes created"),
    ("process_group_s", "the ranks' actors ready: Ray Train sets up the process group"),
    ("train_fn_s", "Ray Train launches the training function"),
    ("started_s", "`started` event: ranks imported, data opened, model built and wrapped, checkpoint lookup"),
    ("val_step0_s", "validation at step 0 logged"),
    ("first_step_s", "first training step logged"),
]
COMPONENTS = [
    ("python_s", "`python -c pass`"),
    ("driver_imports_s", "import of the driver's modules (cli, config, runs, launcher)"),
    ("worker_imports_s", "import of a worker's modules (ray_worker, trainers.loop)"),
    ("ray_init_s", "`ray.init()` + `ray.shutdown()` (local, default settings)"),
]


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(results: dict) -> str:
    """The section: first-step times of the three commands, Kiln's phases, the pieces measured alone."""
    where = f"{results['date']}, {results['machine']}"
    n = len(results["rounds"])
    lines = [
        paragraph(
            "Wall clock from starting the command to the end of the first training step: the quickstart's "
            "model and prepared corpus, 2 processes x 1 CPU thread, DDP over gloo. `kiln train "
            f"{' '.join(KILN_ARGS)}` against benchmarks/bare_ddp.py under `torchrun --standalone "
            "--nproc-per-node 2` and the same loop in a plain Ray Train TorchTrainer "
            "(benchmarks/ray_train_plain.py: ray.init(include_dashboard=False), as Kiln's embedded Ray; "
            "with the dashboard, Ray's default, the baseline would be a few seconds slower)."
            f" Median of {n} rounds after one untimed warm-up of each, "
            f"the order rotated each round; load average {results['load']}."
        ),
        "",
        "| date, machine, versions | kiln train (s) | torchrun (s) | plain Ray Train (s) | kiln - Ray Train (s) "
        f"| goal: kiln <= Ray Train + {GOAL_S:.0f} s |",
        "|---|---|---|---|---|---|",
    ]
    kiln, torchrun, ray = (median(results, k, "first_step_s") for k in COMMANDS)
    gap = kiln - ray if kiln is not None and ray is not None else None
    met = "-" if gap is None else ("met" if gap <= GOAL_S else "missed")
    lines.append(f"| {where} | {fmt(kiln)} | {fmt(torchrun)} | {fmt(ray)} | {fmt(gap)} | {met} |")
    lines += [
        "",
        paragraph(
            "Where the time goes: seconds from the command's start to each moment (median of the rounds), "
            "Kiln's from its output lines, events and metrics rows, Ray Train's from the timestamps of its "
            "own log lines, the ranks' creation from the kernel."
        ),
        "",
        "| moment | kiln train (s) | since the previous | plain Ray Train (s) |",
        "|---|---|---|---|",
    ]
    previous = 0.0
    for key, label in PHASES:
        value = median(results, "kiln", key)
        since = fmt(value - previous) if value is not None else "-"
        lines.append(f"| {label} | {fmt(value)} | {since} | {fmt(median(results, 'ray_train', key))} |")
        previous = value if value is not None else previous
    lines += ["", "Pieces measured alone, once per round (median):", "", "| piece | seconds |", "|---|---|"]
    lines += [f"| {label} | {fmt(median(results, 'components', key))} |" for key, label in COMPONENTS]
    return "\n".join(lines)


def main() -> None:
    rounds_cli(__doc__, measure, render, HEADING, "one round: check the script, not the numbers")


if __name__ == "__main__":
    main()
