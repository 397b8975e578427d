"""Helpers shared by the benchmark scripts: the processes' environment, formatting and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
# One process on one GPU, as benchmarks/gpu.py and benchmarks/gpu_llama.py start every run.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
NOT_RUN = "not run: the time budget was spent"


def base_env(cache_dir: str) -> dict[str, str]:
    """What every process gets: no RAY_* of the caller, offline W&B and hub, one corpus cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        KILN_CACHE_DIR=cache_dir,
        COLUMNS="200",
    )
    return env


def seconds(values: list[float]) -> str:
    """Durations in seconds, one decimal, comma-separated."""
    return ", ".join(f"{v:.1f}" for v in values)


def paragraph(text: str) -> str:
    """Text wrapped at 105 columns, words and hyphenated words kept whole."""
    return textwrap.fill(text, width=105, break_long_words=False, break_on_hyphens=False)


def write_docs(heading: str, body: str) -> None:
    """Replace (or append) the section `heading` of docs/benchmarks.md, leaving the others as they are."""
    text = DOCS.read_text()
    section = f"{heading}\n\n{body}\n"
    start = text.find(heading)
    if start < 0:
        DOCS.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + len(heading))
    rest = text[end + 1 :] if end >= 0 else ""
    DOCS.write_text(text[:start] + section + ("\n" + rest if rest else ""))


def publish(work: Path, results: dict, render: Callable[[dict], str], heading: str, docs: bool) -> None:
    """Save results.json in work, print render(results) and, if docs, write it as the section `heading`."""
    (work / "results.json").write_text(json.dumps(results, indent=2))
    body = render(results)
    print("\n" + body)
    if docs:
        write_docs(heading, body)
        print(f"\nwritten to {DOCS.relative_to(REPO)}")


def rounds_cli(doc: str, measure: Callable, render: Callable[[dict], str], heading: str, quick_help: str) -> None:
    """The command line of a benchmark taking --quick, --rounds N and --no-docs: measure, print, publish."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--rounds", type=int, default=None, help="rounds to run (each benchmark's default if absent)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    results = measure(args.quick, args.rounds)
    publish(Path(results["work"]), results, render, heading, docs=not (args.no_docs or args.quick))


class Budget:
    """The seconds a benchmark may still spend: each run gets what is left, none starts with under MIN_RUN_S (or the
    seconds a run says it needs)."""

    MIN_RUN_S = 60.0

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        """Seconds left, or None without a budget."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def allows_a_run(self, needs_s: float | None = None) -> bool:
        """Whether another run (of needs_s seconds, MIN_RUN_S if not said) may start."""
        left = self.left()
        return left is None or left >= max(self.MIN_RUN_S, needs_s or 0.0)


def log_tail(log: Path, lines: int = 25) -> str:
    """The last lines of a run's log, for a failure that must be read off a machine already given back."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def launch(
    cmd: list[str], env: dict, log: Path, timeout: float | None = None, done: Callable[[], bool] | None = None
) -> int:
    """Run cmd in the repository, its output to log; its exit code, -1 if it ran past timeout, 0 once done() holds.

    At the timeout or once done(), the command and every process under it are killed: torchrun starts its workers
    in sessions of their own, which would otherwise outlive it holding the GPU. done() lets a run stop when what is
    measured is in (a Kiln run's final evaluation and checkpoint are not; an 8B checkpoint would not fit the disk).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        while True:
            try:
                return process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            finished = done is not None and done()
            if finished or (deadline is not None and time.monotonic() > deadline):
                kill_tree(process.pid)
                return 0 if finished else -1


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (found first: once it dies, its children lose their parent), and
    wait for them to end. SIGKILL, not SIGTERM: a Kiln worker answers SIGTERM with a checkpoint."""
    import psutil

    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=60)


def torchrun(
    overrides: list[str], env: dict, log: Path, timeout: float | None = None, done: Callable[[], bool] | None = None
) -> int:
    """`torchrun --nproc-per-node 1 -m orchestrator.torchrun OVERRIDES` through launch(): its exit code."""
    return launch([*TORCHRUN, "-m", "orchestrator.torchrun", *overrides], env, log, timeout, done)


def compose(overrides: list[str]) -> str | None:
    """None if `kiln train` overrides compose into a valid config (one process: cluster.num_workers=1), else the
    error."""
    from orchestrator.config import UsageError, compose_config

    try:
        compose_config(["cluster.num_workers=1", *overrides])
    except UsageError as exc:
        return str(exc)
    return None


def prepare_corpus(cache_dir: str, overrides: list[str]) -> str:
    """Prepare the built-in corpus these overrides train on (its seq_len), once, before any timed run; its URL."""
    os.environ["KILN_CACHE_DIR"] = cache_dir
    from orchestrator.config import compose_config, finalize
    from orchestrator.run.lifecycle import resolve_data

    cfg = finalize(compose_config(["cluster.num_workers=1", *overrides]))
    resolve_data(cfg, log=lambda message: print(f"  {message}", flush=True))
    return str(cfg.data.path)


def machine() -> str:
    """The machine and the versions a row was measured with: OS, CPU count, memory, Python, torch, Ray, GPU."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # a GPU machine running the loop alone has no Ray
            return "not installed"

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}; Python {platform.python_version()}, "
        f"torch {installed('torch')}, Ray {installed('ray')}, transformers {installed('transformers')}, "
        f"DeepSpeed {installed('deepspeed')}"
    )


def today() -> str:
    """The date a row was measured, UTC, as YYYY-MM-DD."""
    import datetime

    return datetime.datetime.now(datetime.UTC).date().isoformat()


def quickstart_overrides(run_id: str, root: str | Path, steps: int) -> list[str]:
    """`kiln train` arguments of a benchmark's quickstart run: steps steps, evaluated and saved once, at the end."""
    return [
        "experiment=quickstart",
        f"run.id={run_id}",
        f"storage.root={root}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "tracker=none",
    ]


class CpuSampler:
    """Every process's CPU seconds, sampled on a thread while a run goes on, to say where a window's CPU went.

    A training step on this machine competes with everything else for 2 cores, so a system's other processes
    (Ray's control processes and helper actors, a launcher) cost its workers time; this shows how much.
    """

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        while True:
            seen: dict[int, tuple[str, float]] = {}
            for process in psutil.process_iter(["cmdline", "name", "cpu_times"]):
                times, words = process.info["cpu_times"], process.info["cmdline"] or [process.info["name"] or ""]
                if times is not None and process.pid != os.getpid():
                    seen[process.pid] = (" ".join(words), times.user + times.system)
            self.samples.append((time.time(), seen))
            if self._stop.wait(self.every_s):
                return

    def cores(self, start: float, end: float, is_worker: Callable[[str], bool]) -> dict[str, float]:
        """Cores busy between the wall-clock times start and end (the samples just inside them): the
        processes is_worker(cmdline) picks, and all the others (this sampler's own process left out)."""
        inside = [(at, seen) for at, seen in self.samples if start <= at <= end]
        if len(inside) < 2:
            raise ValueError(f"fewer than 2 CPU samples between {start:.1f} and {end:.1f}")
        (first_at, first), (last_at, last) = inside[0], inside[-1]
        used = {"workers": 0.0, "others": 0.0}
        for pid, (cmdline, cpu) in last.items():
            if pid in first and first[pid][0] == cmdline:
                used["workers" if is_worker(cmdline) else "others"] += cpu - first[pid][1]
        return {kind: seconds_used / (last_at - first_at) for kind, seconds_used in used.items()}
