"""Kiln on a long-lived Ray cluster: submit-to-first-step against `kiln train`'s embedded Ray, and node loss.

    .venv/bin/python -m benchmarks.cluster [--rounds 3] [--node-losses 3] [--s3] [--no-docs] [--keep]

Starts a real multi-node Ray cluster on this machine (tests/ray_cluster.py: a head with 1 CPU and worker
nodes node_a and node_b with 1 CPU each, token authentication on) and stops it at the end, leaving no
process behind. Runs live under one absolute local folder (every "node" here shares the filesystem), or
on moto's S3 server with --s3. Everything is wall clock on this machine, taken by this script: the
moment it invokes a command or kills a node, against the `time` a run writes with each metrics row and
event (time.time() on the same machine). Two measurements:

1. Submit to first step: from invoking `kiln submit --address URL` (the tiny model of tests/helpers.py,
   2 workers) to the `time` of the run's first training row in metrics.jsonl, against `kiln train` of the
   same config on an embedded Ray (no address), alternated round by round (embedded, cluster, ...) after
   one untimed warm-up of each. The embedded run starts its own Ray every time; the cluster is already
   up: that is what a long-lived cluster is for. The run's `launched` (its driver began) and `started`
   (its worker group restored and ready) events and, for the cluster, Ray's own job start time, split the
   time into phases.
2. Node loss to first step after restart: a submitted run (placement spread, every step checkpointed);
   after step 5, the worker node (not the head) holding one of its ranks is SIGKILLed whole (raylet,
   workers, agents); measured until Ray Train's next `started` event and the first metrics row logged
   after the kill. The node is then added back and the run stopped (`kiln stop --wait`).

Prints markdown tables and, unless --no-docs, writes them into docs/benchmarks.md as the section
"## Cluster: submit and node loss (benchmarks/cluster.py)", replacing that whole section (a reading of the
numbers written there by hand goes with it: write the new one). Asserts nothing about the numbers. Takes
about 9 minutes on 2 cores; run it on an otherwise idle machine (the load before each run is reported).
Leaves its logs and results.json in a temporary folder it names (the run folders too, with --keep).
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
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import base_env, paragraph, publish, seconds  # noqa: E402
from tests.helpers import BIN, TINY  # noqa: E402

HEADING = "## Cluster: submit and node loss (benchmarks/cluster.py)"
BUCKET = "kiln-bench"
POLL_S = 0.1
CLOCK_SKEW = [0.0]  # set by main(): see measure_clock_skew
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED", "PREEMPTED")
JOB_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# Reading a run's folder (local or S3) the way `kiln status` does.


def metrics_rows(run_url: str) -> list[dict]:
    """The run's metrics.jsonl so far, read as `kiln status` reads it."""
    from orchestrator.run.registry import RunRegistry

    root, run_id = run_url.rstrip("/").rsplit("/", 1)
    return RunRegistry(root).metrics(run_id)


def train_rows(run_url: str, after: float = 0.0) -> list[dict]:
    """Training rows (those with train/loss) logged after a moment."""
    return [r for r in metrics_rows(run_url) if "train/loss" in r and r["time"] > after]


def run_events(run_url: str, kind: str) -> list[dict]:
    from trainers.run.events import read_events

    return [event for _, event in read_events(run_url) if event["kind"] == kind]


def run_state(run_url: str) -> str | None:
    from data_pipeline import storage

    try:
        return json.loads(storage.read_text(storage.join(run_url, "run.json")))["state"]
    except FileNotFoundError:
        return None


def wait_for(what: str, predicate, timeout: float, log: Path | None = None):
    """Poll until predicate returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


# The cluster's Jobs API, asked with the token (as tests/integration/test_cluster.py does).


def job_info(cluster, job_id: str) -> dict:
    request = urllib.request.Request(
        f"{cluster.address}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {cluster.token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read().decode())


def kiln(*args: str, env: dict, log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    with open(log, "a") as handle:
        handle.write(f"\n$ kiln {' '.join(args)}\n")
        handle.flush()
        return subprocess.run(
            [str(BIN / "kiln"), *args], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
        )


# Measurement 1: invoke -> first training step.


def first_step_embedded(root: str, run: str, overrides: list[str], env: dict, log: Path) -> dict:
    """`kiln train` (embedded Ray): invoke -> first step logged; waits for the run to end."""
    from data_pipeline import storage

    url = storage.join(root, run)
    with open(log, "a") as handle:
        handle.write(f"\n$ kiln train ... run.id={run}\n")
        handle.flush()
        invoked = time.time()
        process = subprocess.Popen(
            [str(BIN / "kiln"), "train", *overrides, f"run.id={run}", f"storage.root={root}"],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        try:
            watch = FirstStep(url, process, log)
            first = wait_for(f"{run}'s first step", watch, 300, log)[0]
            if process.wait(timeout=300) != 0:
                raise RuntimeError(f"kiln train {run} exited {process.returncode}:\n{log.read_text()[-3000:]}")
        finally:
            if process.poll() is None:
                process.kill()
    return phases(url, invoked, first["time"], watch)


def first_step_cluster(cluster, root: str, run: str, overrides: list[str], env: dict, log: Path) -> dict:
    """`kiln submit --address` (the cluster is up): invoke -> first step logged; waits for the job to end."""
    from data_pipeline import storage

    url = storage.join(root, run)
    invoked = time.time()
    submitted = kiln(
        "submit", "--address", cluster.address, *overrides, f"run.id={run}", f"storage.root={root}", env=env, log=log
    )
    returned = time.time()
    if submitted.returncode != 0:
        raise RuntimeError(f"kiln submit {run} exited {submitted.returncode}:\n{log.read_text()[-3000:]}")
    watch = FirstStep(url, None, log)
    first = wait_for(f"{run}'s first step", watch, 300, log)[0]
    job = wait_for(f"{run}'s job to end", lambda: done_job(cluster, f"kiln-{run}"), 300, log)
    if job["status"] != "SUCCEEDED" or run_state(url) != "SUCCEEDED":
        raise RuntimeError(f"{run}: job {job['status']}, run {run_state(url)}; see {log}")
    result = phases(url, invoked, first["time"], watch)
    result["submit_returned_s"] = returned - invoked
    result["job_started_s"] = job["start_time"] / 1000 - invoked  # Ray's record of when the job began
    return result


def done_job(cluster, job_id: str) -> dict | None:
    info = job_info(cluster, job_id)
    return info if info["status"] in JOB_TERMINAL else None


class FirstStep:
    """A poll for the run's first training rows that, on the way, notes when its processes were created.

    The driver (pid in the `launched` event) and the ranks (pids in `started`) are asked of the kernel
    (psutil's create_time) while they still run, as soon as their event appears.
    """

    def __init__(self, url: str, process: subprocess.Popen | None, log: Path):
        self.url, self.process, self.log = url, process, log
        self.driver_created: float | None = None
        self.ranks_created: list[float | None] | None = None

    def __call__(self) -> list[dict]:
        if self.driver_created is None and (launched := run_events(self.url, "launched")):
            self.driver_created = created(launched[0]["driver"]["pid"])
        if self.ranks_created is None and (started := run_events(self.url, "started")):
            self.ranks_created = [created(rank["pid"]) for rank in started[0]["ranks"]]
        rows = train_rows(self.url)
        if not rows and self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"kiln exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        return rows


def created(pid: int) -> float | None:
    """When the kernel started process pid, on time.time()'s clock (None if it is gone already)."""
    import psutil

    try:
        return psutil.Process(pid).create_time() - CLOCK_SKEW[0]
    except psutil.Error:
        return None


def measure_clock_skew() -> float:
    """psutil's create_time minus time.time() for a process started now: the kernel's boot time is kept in
    whole seconds, so process start times sit up to a second off time.time(); the median of 5 spawns."""
    import psutil

    skews = []
    for _ in range(5):
        before = time.time()
        process = subprocess.Popen(["sleep", "0.1"])
        skews.append(psutil.Process(process.pid).create_time() - before)
        process.wait()
    return statistics.median(skews)


def phases(url: str, invoked: float, first_step: float, watch: FirstStep) -> dict:
    """Seconds from invocation to each moment on the way to the first step."""
    launched = run_events(url, "launched")[0]["time"]
    started = run_events(url, "started")[0]["time"]
    ranks = [t for t in watch.ranks_created or [] if t is not None]
    return {
        "driver_created_s": watch.driver_created - invoked if watch.driver_created else None,
        "launched_s": launched - invoked,
        "workers_created_s": max(ranks) - invoked if ranks else None,
        "started_s": started - invoked,
        "first_step_s": first_step - invoked,
    }


# Measurement 2: node loss -> restarted group -> first step after it.


class DeathWatch:
    """Notes, polling every 5 ms in a thread, the moment a process dies (exits or is a zombie)."""

    def __init__(self, process):
        import threading

        self.process, self.died = process, None
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        import psutil

        while True:
            try:
                if self.process.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.005)
        self.died = time.time()

    def wait(self) -> float:
        self.thread.join(timeout=30)
        assert self.died is not None, f"the raylet (pid {self.process.pid}) did not die"
        return self.died


def node_loss(cluster, root: str, run: str, overrides: list[str], env: dict, log: Path) -> dict:
    from data_pipeline import storage

    url = storage.join(root, run)
    submitted = kiln(
        "submit", "--address", cluster.address, *overrides, f"run.id={run}", f"storage.root={root}", env=env, log=log
    )
    if submitted.returncode != 0:
        raise RuntimeError(f"kiln submit {run} exited {submitted.returncode}:\n{log.read_text()[-3000:]}")
    wait_for(f"{run} at step 5", lambda: any(r["step"] >= 5 for r in train_rows(url)), 300, log)
    (started,) = run_events(url, "started")
    workers = {node.node_id: name for name, node in cluster.nodes.items() if name != "head"}
    victim = next(workers[r["node_id"]] for r in started["ranks"] if r["node_id"] in workers)
    step_at_kill = max(r["step"] for r in train_rows(url))
    name = victim
    try:
        raylet = cluster.processes_of(cluster.nodes[name].node_id)[0]
        death = DeathWatch(raylet)
        called = time.time()
        cluster.kill_node(name)  # finds the raylet and all under it again, SIGKILLs them, waits until all are gone
        returned = time.time()
        killed = death.wait()  # when the raylet died: the moment the node was lost
        restarted = wait_for(
            "the restarted group", lambda: [e for e in run_events(url, "started") if e["time"] > called], 300, log
        )[0]
        first = wait_for("a step after the restart", lambda: train_rows(url, after=called), 300, log)[0]
        failed = [e for e in run_events(url, "failed") if e["time"] > called]
    finally:
        cluster.add_node(name)
    stopped = kiln("stop", run, "--storage-root", root, "--wait", "120", env=env, log=log, timeout=200)
    if stopped.returncode != 0:
        kiln("stop", run, "--now", "--storage-root", root, env=env, log=log, timeout=200)
    wait_for(f"{run}'s job to end", lambda: done_job(cluster, f"kiln-{run}"), 120, log)
    return {
        "node": name,
        "step_at_kill": step_at_kill,
        "kill_node_s": returned - called,
        "raylet_died_s": killed - called,
        "failed_s": failed[0]["time"] - killed if failed else None,
        "cause": failed[0].get("summary") if failed else None,
        "restarted_s": restarted["time"] - killed,
        "restored_step": restarted.get("restored_step"),
        "first_step_s": first["time"] - killed,
        "first_step": first["step"],
    }


# Output.


def machine() -> str:
    import psutil

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}, Ray {version('ray')}, torch {version('torch')}"
    )


def version(module: str) -> str:
    return __import__(module).__version__


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def render(results: dict) -> str:
    rounds, warmup, skew = results["rounds"], results["warmup"], results.get("clock_skew_s", 0.0)
    store = "moto's S3 server (loopback)" if results["s3"] else "one absolute local folder (every node shares it here)"
    cluster = [r["cluster"] for r in rounds]
    lines = [
        paragraph(
            "`kiln submit --address URL` of a 2-worker run (the tests' tiny model: 2 layers x 64, seq 64, global "
            f"batch 8, {results['steps']} steps, tracker=none, fp32, gloo) to a Ray cluster on this machine (head "
            "1 CPU, node_a and node_b 1 CPU each, token auth; started once and left up), against `kiln train` of "
            f"the same config on an embedded Ray, storage.root on {store} for both. Alternated in one run, "
            f"{len(rounds)} rounds of embedded then cluster after one untimed warm-up of each; wall clock from "
            "invoking the command to the `time` of the first training row in metrics.jsonl. The other columns "
            "are medians of the seconds from invocation to the run's `launched` event (its driver begins "
            "training: imports, config and data resolved, Ray not yet started or joined), to the creation of "
            "the later of its two rank processes (the kernel's start time of the pids its `started` event names, "
            f"corrected for the {abs(skew):.2f} s by which psutil's start times read "
            f"{'early' if skew < 0 else 'late'} against time.time() here) and to that `started` event (worker "
            "group up, model built, checkpoint looked for)."
        ),
        "",
        "| date | machine | command | invoke -> first step: median (each, in run order) | -> `launched` | "
        "-> rank processes created | -> `started` |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, label in (("embedded", "`kiln train` (embedded Ray)"), ("cluster", "`kiln submit --address`")):
        values = [r[mode] for r in rounds]
        first = [v["first_step_s"] for v in values]
        lines.append(
            f"| {results['date']} | {results['machine']} | {label} | {statistics.median(first):.1f} s "
            f"({seconds(first)}) | {median(values, 'launched_s')} | {median(values, 'workers_created_s')} | "
            f"{median(values, 'started_s')} |"
        )
    lines += [
        "",
        paragraph(
            f"Cluster, medians from invocation: Ray recorded the job's start at {median(cluster, 'job_started_s')}, "
            f"`kiln submit` returned at {median(cluster, 'submit_returned_s')}, the job's `kiln start` process "
            f"was created at {median(cluster, 'driver_created_s')}. Warm-up round (not in the medians): embedded "
            f"{warmup['embedded']['first_step_s']:.1f} s, cluster {warmup['cluster']['first_step_s']:.1f} s. "
            f"Load average (1 minute) before each timed run: {loads(rounds)}; {results['load']}."
        ),
    ]
    losses = results["node_losses"]
    if losses:
        lines += [
            "",
            paragraph(
                "Node loss: a submitted 2-worker run (placement spread, a checkpoint every step) loses the worker "
                "node holding one of its ranks after step 5 (`LocalRayCluster.kill_node`: SIGKILL of its raylet "
                "and everything under it); times from the moment its raylet died, seen by this script polling "
                "it every 5 ms. `failed` is Kiln recording the failed rank (the first to notice: Ray's health "
                "check or a gloo collective, either can come first), `started` the group Ray Train restarted on "
                "the nodes left, restored from the last committed checkpoint; the first step logged after the "
                "kill re-runs the step after that checkpoint."
            ),
            "",
            "| date | machine | node lost at step | kill -> `failed` recorded | kill -> group restarted "
            "(restored step) | kill -> first step logged (step) |",
            "|---|---|---|---|---|---|",
        ]
        for loss in losses:
            lines.append(
                f"| {results['date']} | {results['machine']} | {loss['node']} at {loss['step_at_kill']} | "
                f"{fmt(loss['failed_s'])} | {loss['restarted_s']:.1f} s ({loss['restored_step']}) | "
                f"{loss['first_step_s']:.1f} s ({loss['first_step']}) |"
            )
    return "\n".join(lines)


def loads(rounds: list[dict]) -> str:
    values = [r[mode]["load_before"] for r in rounds for mode in ("embedded", "cluster")]
    return ", ".join(f"{v:.1f}" for v in values)


def median(values: list[dict], key: str) -> str:
    known = [v[key] for v in values if v.get(key) is not None]
    return f"{statistics.median(known):.1f} s" if known else "-"


# Setup.


def rounded(values: dict) -> str:
    return json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in values.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of embedded + cluster")
    parser.add_argument("--steps", type=int, default=30, help="train.max_steps of the submit-to-first-step runs")
    parser.add_argument("--node-losses", type=int, default=3, help="node-loss repetitions (0: none)")
    parser.add_argument("--s3", action="store_true", help="storage.root on moto's S3 server instead of a local folder")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (checkpoints included)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    from tests.ray_cluster import LocalRayCluster
    from tests.s3_server import aws_env, start_moto, stop

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-cluster-"))
    log = work / "commands.log"
    env = base_env(os.environ.get("KILN_CACHE_DIR", os.path.expanduser("~/.cache/kiln")))
    server = None
    if args.s3:
        server, endpoint = start_moto(open(work / "moto.log", "w"))  # noqa: SIM115 (the server's log, open while it runs)
        env.update(aws_env(endpoint))
        os.environ.update(aws_env(endpoint))
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        root = f"s3://{BUCKET}/runs"
    else:
        root = str(work / "runs")
    print(f"working in {work} (commands' output: {log}; runs under {root})", flush=True)
    run_config = [*TINY, "tracker=none", f"train.max_steps={args.steps}"]
    loss_config = [
        *TINY,
        "tracker=none",
        "train.max_steps=200",
        "train.checkpoint_every=1",
        "checkpoint.keep_last=2",
        "cluster.placement=spread",
    ]
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "steps": args.steps, "s3": args.s3}
    CLOCK_SKEW[0] = measure_clock_skew()
    results["clock_skew_s"] = CLOCK_SKEW[0]
    load_before = os.getloadavg()[0]
    cluster = LocalRayCluster(work, env)
    try:
        started = time.monotonic()
        cluster.start()
        print(f"cluster up in {time.monotonic() - started:.1f} s at {cluster.address}", flush=True)
        client = cluster.client_env(env)

        def one_round(tag: str) -> dict:
            load = os.getloadavg()[0]
            embedded = first_step_embedded(root, f"embedded-{tag}", run_config, env, log)
            embedded["load_before"], load = load, os.getloadavg()[0]
            print(f"{tag}: embedded {rounded(embedded)}", flush=True)
            submitted = first_step_cluster(cluster, root, f"cluster-{tag}", run_config, client, log)
            submitted["load_before"] = load
            print(f"{tag}: cluster  {rounded(submitted)}", flush=True)
            return {"embedded": embedded, "cluster": submitted}

        results["warmup"] = one_round("warmup")
        results["rounds"] = [one_round(str(i)) for i in range(1, args.rounds + 1)]
        results["node_losses"] = []
        for i in range(1, args.node_losses + 1):
            loss = node_loss(cluster, root, f"nodeloss-{i}", loss_config, client, log)
            print(f"node loss {i}: {rounded(loss)}", flush=True)
            results["node_losses"].append(loss)
    finally:
        cluster.stop()
        if server is not None:
            stop(server)
    left = cluster.leftovers()
    assert not left, f"Ray processes left behind: {left}"
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    results["load"] = f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    publish(work, results, render, HEADING, docs=not args.no_docs)
    if not args.keep:
        shutil.rmtree(work / "runs", ignore_errors=True)  # logs and results.json stay


if __name__ == "__main__":
    main()
