"""What the fault-tolerance stories share: runs on the local S3 server, their events, and real kills."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.helpers import BIN, REPO, STRATEGY_RUN

# The reference config (2 workers), checkpointed every other step: enough commits for retention to delete some
# and for a kill to land between two, and the same math, so losses compare with the uninterrupted run's. (Every
# step cost the fault-tolerance stories 40% of their time: a commit on S3 is many round trips.)
EVERY_OTHER_STEP = [o for o in STRATEGY_RUN if not o.startswith("train.checkpoint_every")] + [
    "train.checkpoint_every=2",
    "checkpoint.keep_last=3",
    "checkpoint.keep_every=10",
    "cluster.max_failures=2",
]


def s3_root(bucket: str) -> str:
    """A fresh storage.root on the test bucket."""
    return f"s3://{bucket}/ft-{uuid.uuid4().hex[:8]}"


def s3_client():
    """An s3fs client for the test server (uncached, so endpoint changes are seen)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def read_json(url: str) -> dict | None:
    """A JSON object on S3, or None if absent."""
    fs = s3_client()
    try:
        return json.loads(fs.cat_file(url.removeprefix("s3://")))
    except FileNotFoundError:
        return None


def metrics(root: str, run: str) -> list[dict]:
    """Every row of the run's metrics.jsonl on S3."""
    text = s3_client().cat_file(f"{root}/{run}/metrics.jsonl".removeprefix("s3://")).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def events(root: str, run: str, kind: str | None = None) -> list[dict]:
    """The run's events, oldest first (optionally one kind)."""
    from trainers.run.events import read_events

    found = [event for _, event in read_events(f"{root}/{run}")]
    return [e for e in found if kind is None or e["kind"] == kind]


def committed_steps(root: str, run: str) -> list[int]:
    """Steps whose checkpoint folder holds a MANIFEST.json."""
    fs = s3_client()
    base = f"{root}/{run}/checkpoints".removeprefix("s3://")
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(n[5:]) for n in names if n.startswith("step_") and fs.exists(f"{base}/{n}/MANIFEST.json"))


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 240, proc=None) -> object:
    """Poll predicate until truthy; fail naming what was awaited (and the process's output if it died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) while waiting for {what}:\n{output(proc)}")
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f":\n{output(proc)}" if proc else ""))


def start_kiln(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`kiln ARGS` in the background, in its own session (so the test can kill it and its Ray)."""
    handle = open(log, "w")
    process = subprocess.Popen(
        [str(BIN / "kiln"), *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        start_new_session=True,
    )
    process.log_path = log  # type: ignore[attr-defined]
    return process


def output(proc) -> str:
    """The tail of a background kiln's output."""
    path = getattr(proc, "log_path", None)
    return Path(path).read_text()[-4000:] if path else ""


def finish(proc, timeout: float = 400) -> int:
    """Wait for a background kiln; returns its exit code."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise AssertionError(f"kiln did not finish in {timeout}s:\n{output(proc)}") from None


def worker_pid(root: str, run: str, rank: int, attempt: int = -1) -> int:
    """The pid of a rank's worker process, from the run's `started` event."""
    started = events(root, run, "started")[attempt]
    return next(r["pid"] for r in started["ranks"] if r["rank"] == rank)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and everything it started (a driver and its embedded Ray)."""
    try:
        parent = psutil.Process(pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)
    psutil.wait_procs(family, timeout=30)


def losses(rows: list[dict]) -> dict[int, list[float]]:
    """step -> every train/loss logged for it (a step re-run after a restart is logged twice)."""
    found: dict[int, list[float]] = {}
    for row in rows:
        if "train/loss" in row:
            found.setdefault(row["step"], []).append(row["train/loss"])
    return found


def assert_same_losses(rows: list[dict], reference: list[dict], steps=range(1, 21)) -> None:
    """Every loss logged for each step (first try and re-runs alike) equals the uninterrupted run's."""
    logged, expected = losses(rows), {s: v[0] for s, v in losses(reference).items()}
    assert sorted(logged) == list(steps), sorted(logged)
    for step, values in logged.items():
        assert values == [expected[step]] * len(values), (step, values, expected[step])


def reference_rows(trained_runs, strategy: str) -> list[dict]:
    """The metrics of the strategy's uninterrupted 20-step torchrun run (the session's trained_runs)."""
    path = trained_runs(strategy) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
