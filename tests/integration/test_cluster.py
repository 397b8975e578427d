"""Kiln on a real Ray cluster: submitted from outside, on several nodes, losing nodes and drivers.

The session's `ray_cluster` is a head and two worker nodes (`node_a`, `node_b`) started with the
`ray` CLI on this machine, with token authentication on. Runs live on the local S3 server; the
cluster's nodes hold its credentials, the submitting "laptop" (these tests) holds only the token.
Every run checkpoints each step, so its losses are compared bit for bit with the uninterrupted torchrun
run of the same config; a failpoint holds a run at the step where its story kills or stops something.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.failpoints import Failpoints
from tests.helpers import BIN, REPO
from tests.integration.ft_harness import (
    EVERY_OTHER_STEP,
    assert_same_losses,
    committed_steps,
    events,
    losses,
    metrics,
    read_json,
    reference_rows,
    s3_client,
    s3_root,
    wait_for,
)
from tests.ray_cluster import WORKER_NODE

pytestmark = pytest.mark.slow

# The submitter's own credentials: real enough for the S3 server, and recognisable if they ever leak.
LAPTOP_SECRETS = {"AWS_SECRET_ACCESS_KEY": "laptop-secret-7f3c91", "WANDB_API_KEY": "wandb-secret-0b5e27"}


def kiln_at(cluster, *args: str, timeout: float = 420, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`kiln ARGS` as a user with the cluster's token in their environment."""
    env = {**cluster.client_env({**os.environ, "COLUMNS": "200", **LAPTOP_SECRETS}), **(extra_env or {})}
    return subprocess.run(
        [str(BIN / "kiln"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def ray_cli(cluster, *args: str) -> subprocess.CompletedProcess:
    """Ray's own `ray job ...` against the cluster, with the token."""
    env = cluster.client_env({**os.environ, "RAY_API_SERVER_ADDRESS": cluster.address})
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=120)


def submit(
    cluster, root: str, run: str, *overrides: str, follow: bool = False, env: dict | None = None
) -> subprocess.CompletedProcess:
    """kiln submit of the 2-worker reference config (ddp) as run `run` under root (env: e.g. armed failpoints)."""
    args = ["submit", "--address", cluster.address, *EVERY_OTHER_STEP, f"run.id={run}", f"storage.root={root}"]
    args += overrides
    return kiln_at(cluster, *args, *(["--follow"] if follow else []), extra_env=env)


def status(cluster, root: str, run: str) -> dict:
    """`kiln status RUN --json`."""
    result = kiln_at(cluster, "status", run, "--json", "--storage-root", root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def rank_nodes(attempt: dict) -> dict[int, str]:
    """rank -> Ray node id, from an attempt of `kiln status --json`."""
    return {r["rank"]: r["node_id"] for r in attempt["ranks"]}


def test_a_spread_run_submitted_to_the_cluster_trains_on_two_nodes_exactly(ray_cluster, s3, trained_runs):
    """Story (a): kiln submit --follow returns the run's exit code; no secret travels with the job."""
    root, run = s3_root(s3), "spread"
    done = submit(ray_cluster, root, run, "cluster.placement=spread", follow=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"run {run} submitted to {ray_cluster.address} as Ray job kiln-{run}" in done.stdout
    assert f"SUCCEEDED run {run}: step 20" in done.stdout  # the driver's log, streamed
    assert_same_losses(metrics(root, run), reference_rows(trained_runs, "ddp"))

    state = status(ray_cluster, root, run)
    assert state["state"] == "SUCCEEDED" and state["cluster_address"] == ray_cluster.address
    assert state["job"]["job_id"] == f"kiln-{run}" and state["job"]["status"] == "SUCCEEDED"
    (attempt,) = state["attempts"]
    worker_nodes = {ray_cluster.nodes[n].node_id for n in ("node_a", "node_b")}
    assert len(set(rank_nodes(attempt).values())) == 2, attempt["ranks"]  # spread: two nodes
    assert set(rank_nodes(attempt).values()) <= worker_nodes | {ray_cluster.nodes["head"].node_id}
    record = read_json(f"{root}/{run}/run.json")
    assert record["job_id"] == f"kiln-{run}" and record["cluster_address"] == ray_cluster.address

    # Ray's own tools see the same job; nothing secret was sent with it.
    listed = ray_cli(ray_cluster, "job", "list")
    assert f"kiln-{run}" in listed.stdout, listed.stderr
    logs = ray_cli(ray_cluster, "job", "logs", f"kiln-{run}")
    assert f"kiln start {run}" in logs.stdout and "SUCCEEDED" in logs.stdout
    info = ray_cli(ray_cluster, "job", "status", f"kiln-{run}", "-v")
    job_info = ray_job_info(ray_cluster, f"kiln-{run}")
    for secret in (*LAPTOP_SECRETS.values(), "testing", ray_cluster.token):
        assert secret not in job_info and secret not in logs.stdout and secret not in info.stdout, secret
    assert json.loads(job_info)["metadata"] == {"kiln_run_id": run, "kiln_storage_root": root}

    driver_log = kiln_at(ray_cluster, "logs", run, "--storage-root", root)
    assert driver_log.returncode == 0 and f"SUCCEEDED run {run}" in driver_log.stdout
    worker_log = kiln_at(ray_cluster, "logs", run, "--rank", "1", "--storage-root", root)
    assert worker_log.returncode == 0 and "checkpoint step 20 committed" in worker_log.stdout


def ray_job_info(cluster, job_id: str) -> str:
    """The job's record as Ray's Jobs API returns it (entrypoint, runtime env, metadata), as JSON text."""
    request = urllib.request.Request(
        f"{cluster.address}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {cluster.token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def test_the_jobs_api_refuses_a_request_without_the_token_and_kiln_says_what_to_do(ray_cluster, s3, tmp_path):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_cluster.address}/api/jobs/", timeout=30)
    assert refused.value.code == 401

    root = s3_root(s3)
    result = kiln_at(
        ray_cluster,
        "submit",
        "--address",
        ray_cluster.address,
        f"storage.root={root}",
        extra_env={"RAY_AUTH_TOKEN": "not-the-token"},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refused the request" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not-the-token" not in result.stderr
    unregistered = kiln_at(ray_cluster, "runs", "--storage-root", root)
    assert "no runs under" in unregistered.stdout  # nothing was registered for a job never submitted

    typo = kiln_at(ray_cluster, "submit", "--address", ray_cluster.address, f"storage.root={root}", "optim.lrr=1")
    assert typo.returncode == 2 and "optim.lrr" in typo.stderr and len(typo.stderr.strip().splitlines()) == 1
    relative = kiln_at(ray_cluster, "submit", "--address", ray_cluster.address, "storage.root=runs")
    assert relative.returncode == 2 and "relative local path" in relative.stderr
    listed = ray_cli(ray_cluster, "job", "list")
    assert "optim.lrr" not in listed.stdout and "storage.root=runs" not in listed.stdout


def test_a_job_whose_entrypoint_never_ran_kiln_says_the_run_never_started_with_its_log(ray_cluster, s3, tmp_path):
    """Issue 27: a job that fails before Kiln runs (a head without `kiln` on its PATH; here, shipped code whose
    Python exits as that shell does) is not a lost driver that `kiln resume` could continue."""
    not_kiln = tmp_path / "not-kiln"
    (not_kiln / "orchestrator").mkdir(parents=True)
    # Ray puts the shipped folder first on the PYTHONPATH of the job's processes: the entrypoint's Python
    # (`python -m orchestrator.cli start ...`, argv ['-m', 'start', ...] this early) ends here, before Kiln runs.
    (not_kiln / "sitecustomize.py").write_text(
        "import os, sys\nif sys.argv[:2] == ['-m', 'start']:\n"
        "    os.write(2, b'/bin/sh: 1: kiln: not found\\n')\n    os._exit(127)\n"
    )
    root, run = s3_root(s3), f"nostart-{uuid.uuid4().hex[:6]}"
    result = kiln_at(
        ray_cluster,
        *("submit", "--address", ray_cluster.address, "--working-dir", str(not_kiln), "--follow"),
        *(f"run.id={run}", f"storage.root={root}"),
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the run never started on the cluster" in result.stdout, result.stdout
    assert "kiln: not found" in result.stdout.split("The job's log ends with:")[-1]
    assert "its driver was lost" not in result.stdout
    shown = status(ray_cluster, root, run)
    assert (shown["state"], shown["recorded_state"], shown["job"]["status"]) == ("NEVER_STARTED", "PENDING", "FAILED")


def test_losing_a_worker_node_mid_run_restarts_on_the_nodes_left_and_names_the_node(
    ray_cluster, s3, trained_runs, tmp_path
):
    """Story (b): SIGKILL a worker node's raylet and workers (found by node id); the run finishes exactly."""
    root, run = s3_root(s3), f"nodeloss-{uuid.uuid4().hex[:4]}"
    points = Failpoints(tmp_path / "fp", f"loop.after_step(run={run},step=9,rank=0)=pause")  # step 8 committed
    assert submit(ray_cluster, root, run, "cluster.placement=spread", env=points.env).returncode == 0
    points.wait("loop.after_step")
    started = events(root, run, "started")[0]
    by_id = {node.node_id: name for name, node in ray_cluster.nodes.items() if name != "head"}
    victim_id = next(r["node_id"] for r in started["ranks"] if r["node_id"] in by_id)
    name = by_id[victim_id]
    try:
        ray_cluster.kill_node(name)
        points.release("loop.after_step")  # rank 0, if its node lives, goes on into a collective its peer left
        wait_for("the run to succeed", lambda: read_json(f"{root}/{run}/run.json")["state"] == "SUCCEEDED", 400)
    finally:
        ray_cluster.add_node(name)  # the next test gets its two worker nodes back
    assert_same_losses(metrics(root, run), reference_rows(trained_runs, "ddp"))
    state = status(ray_cluster, root, run)
    first, second = state["attempts"][:2]
    assert first["outcome"] == "FAILED" and first["cause"]["node_id"] == victim_id, first
    assert first["cause"].get("lost_node") == victim_id and "was lost" in first["cause"]["summary"], first
    assert victim_id not in rank_nodes(second).values() and second["restored_step"] >= 8
    assert state["state"] == "SUCCEEDED"
    text = kiln_at(ray_cluster, "status", run, "--storage-root", root).stdout
    assert f"node {victim_id} was lost" in text, text


def test_a_killed_driver_shows_driver_lost_and_kiln_resume_address_finishes_it_exactly(
    ray_cluster, s3, trained_runs, tmp_path
):
    """Story (c): SIGKILL the Ray job's driver process; `kiln resume RUN --address` continues it."""
    root, run = s3_root(s3), "driverloss"
    points = Failpoints(tmp_path / "fp", f"loop.after_step(run={run},step=9,rank=0)=pause")  # step 8 committed
    assert submit(ray_cluster, root, run, env=points.env).returncode == 0
    points.wait("loop.after_step")  # held there until the job (and so its workers) dies with its driver
    # The kiln process driving the run, as its record names it (Ray's driver_info pid may be a wrapper).
    os.kill(read_json(f"{root}/{run}/run.json")["driver"]["pid"], signal.SIGKILL)
    wait_for("the job to fail", lambda: status(ray_cluster, root, run)["job"]["status"] == "FAILED", 120)
    lost = status(ray_cluster, root, run)
    assert lost["state"] == "DRIVER_LOST" and lost["recorded_state"] == "RUNNING"
    assert lost["resume_command"].startswith(f"kiln resume {run} --address {ray_cluster.address}")
    text = kiln_at(ray_cluster, "status", run, "--storage-root", root).stdout
    assert "DRIVER_LOST" in text and "its driver is gone" in text

    resumed = kiln_at(ray_cluster, "resume", run, "--address", ray_cluster.address, "--storage-root", root, "--follow")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert f"as Ray job kiln-{run}-2" in resumed.stdout
    assert_same_losses(metrics(root, run), reference_rows(trained_runs, "ddp"))
    done = status(ray_cluster, root, run)
    assert done["state"] == "SUCCEEDED" and done["job"]["job_id"] == f"kiln-{run}-2"
    # The killed driver's attempt: closed by the resume (DRIVER_LOST), unless Ray's controller recorded its
    # workers dying with the job first (FAILED); either way it ended, and the resume restored from a commit.
    assert done["attempts"][0]["outcome"] in ("DRIVER_LOST", "FAILED"), done["attempts"][0]
    assert done["attempts"][-1]["restored_step"] >= 8 and done["attempts"][-1]["outcome"] == "SUCCEEDED"


def test_kiln_stop_on_a_submitted_run_preempts_it_and_kiln_resume_continues_it_on_the_cluster(
    ray_cluster, s3, trained_runs, tmp_path
):
    """Story (d): a graceful stop commits a checkpoint (PREEMPTED, exit 3); resume finishes it exactly."""
    root, run = s3_root(s3), "stopped"
    # Held after step 6 until `kiln stop` has written the STOP request, so the stop lands mid-run every time.
    points = Failpoints(tmp_path / "fp", f"loop.after_step(run={run},step=6,rank=0)=pause")
    assert submit(ray_cluster, root, run, env=points.env).returncode == 0
    points.wait("loop.after_step")
    with ThreadPoolExecutor(1) as pool:
        stopping = pool.submit(kiln_at, ray_cluster, "stop", run, "--storage-root", root, "--wait", "180")
        wait_for("the STOP request", lambda: s3_client().exists(f"{root}/{run}/STOP".removeprefix("s3://")))
        points.release("loop.after_step")
        stop = stopping.result()
    assert stop.returncode == 0 and "PREEMPTED" in stop.stdout, stop.stdout + stop.stderr
    # `kiln stop --wait` returns once the run is recorded PREEMPTED; its driver exits just after, and Ray's job
    # record gets the exit code only then (a CI run read it in between).
    job_ended = lambda: status(ray_cluster, root, run)["job"]["driver_exit_code"] is not None  # noqa: E731
    wait_for("Ray to record the driver's exit code", job_ended, 120)
    preempted = status(ray_cluster, root, run)
    # The driver exits 3 as `kiln train` does when preempted, which Ray counts as a FAILED job.
    assert preempted["state"] == "PREEMPTED" and preempted["job"]["driver_exit_code"] == 3
    assert preempted["checkpoint"]["step"] == preempted["step"] < 20

    # This time the code travels with the job (--working-dir), as for a cluster without Kiln in its image.
    resumed = kiln_at(
        ray_cluster,
        "resume",
        run,
        "--address",
        ray_cluster.address,
        "--storage-root",
        root,
        "--follow",
        "--working-dir",
        str(REPO),
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert f"python -m orchestrator.cli resume {run}" in resumed.stdout  # the entrypoint Ray ran
    assert_same_losses(metrics(root, run), reference_rows(trained_runs, "ddp"))
    assert status(ray_cluster, root, run)["state"] == "SUCCEEDED"


def test_ray_job_stop_and_kiln_stop_now_end_a_submitted_run_at_once(ray_cluster, s3):
    """Ray's `ray job stop` and `kiln stop --now` both stop the job; the run is resumable, never stuck RUNNING.

    Ray SIGTERMs the driver and SIGKILLs it a few seconds later: a driver that commits a checkpoint in
    that grace ends the run PREEMPTED, one that cannot is lost (DRIVER_LOST, or STOPPED by --now).
    """
    root, run = s3_root(s3), "stopnow"
    assert submit(ray_cluster, root, run, "train.max_steps=1000").returncode == 0
    wait_for("step 2 committed", lambda: max(committed_steps(root, run), default=0) >= 2)
    stopped = ray_cli(ray_cluster, "job", "stop", f"kiln-{run}")
    assert stopped.returncode == 0, stopped.stderr
    ended = ("DRIVER_LOST", "PREEMPTED")
    wait_for("the run to end", lambda: status(ray_cluster, root, run)["state"] in ended, 120)

    again = kiln_at(ray_cluster, "resume", run, "--address", ray_cluster.address, "--storage-root", root)
    assert again.returncode == 0, again.stderr
    wait_for("the resumed attempt", lambda: len(events(root, run, "started")) >= 2, 240)
    now = kiln_at(ray_cluster, "stop", run, "--now", "--storage-root", root)
    assert now.returncode == 0, now.stderr
    final = status(ray_cluster, root, run)
    assert final["state"] in ("STOPPED", "PREEMPTED") and final["job"]["status"] in ("STOPPED", "FAILED"), final
    if final["state"] == "STOPPED":
        assert "kiln stop --now" in final["error"]
    assert final["resume_command"] and final["job"]["job_id"] == f"kiln-{run}-2"
    assert "was stopped" in ray_cli(ray_cluster, "job", "status", f"kiln-{run}-2").stdout


def test_an_elastic_run_shrinks_on_node_loss_grows_back_and_keeps_the_math_of_a_fixed_size_run(
    ray_cluster, s3, tmp_path
):
    """cluster.num_workers=[1,2]: lose a node (2 -> 1 worker), get it back (1 -> 2); losses as a 2-worker run's.

    Two holds make the story exact: the 2-worker group is held at step 6 while node_a dies, and the 1-worker
    group at step 10 until Ray, seeing node_a back, grows the group (which ends the held worker); so the run
    cannot finish before it shrinks or grows, however slowly this machine goes."""
    from tests.helpers import torchrun

    settings = [o for o in EVERY_OTHER_STEP if not o.startswith(("model.dropout", "train.max_steps"))]
    # No dropout: one worker draws other dropout masks than two (the rest of the math is the same).
    settings += ["model.dropout=0.0", "train.max_steps=16"]
    torchrun(*settings, "run.id=fixed", f"storage.root={tmp_path}")
    reference = [json.loads(line) for line in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]

    root, run = s3_root(s3), "elastic"
    points = Failpoints(
        tmp_path / "fp",
        f"loop.after_step(run={run},step=6,rank=0)=pause",  # 2 workers, step 4 committed
        f"loop.after_step(run={run},step=10,rank=0)=pause",  # 1 worker, step 8 committed
    )
    elastic = ["cluster.num_workers=[1,2]", "cluster.resize_check_s=3", "cluster.resources_per_worker={worker_node:1}"]
    args = ["submit", "--address", ray_cluster.address, *settings, *elastic, f"run.id={run}", f"storage.root={root}"]
    # An elastic group starts with what is free: the last test's stopped job may still be releasing a node,
    # and Ray Train's reservations for the jobs it stopped outlive them (tests/ray_cluster.py says how long).
    ray_cluster.wait_until_free(WORKER_NODE, 2)
    assert ray_cluster.forget_train_reservations() is not None, "Ray Train's reservations could not be withdrawn"
    assert kiln_at(ray_cluster, *args, extra_env=points.env).returncode == 0
    points.wait("loop.after_step", step=6)
    assert events(root, run, "started")[0]["world_size"] == 2
    lost = ray_cluster.nodes["node_a"].node_id
    try:
        ray_cluster.kill_node("node_a")
        points.release("loop.after_step", run=run, step=6, rank=0)  # if its node lives, Ray ends it anyway
        points.wait("loop.after_step", step=10)
        assert [e["world_size"] for e in events(root, run, "started")][-1] == 1
    finally:
        ray_cluster.add_node("node_a")
    # Ray's resource view refreshes every 20 s, and the group is checked for room every 3 s (resize_check_s).
    wait_for("the group to grow back", lambda: events(root, run, "started")[-1]["world_size"] == 2, 120)
    points.release("loop.after_step", run=run, step=10, rank=0)
    wait_for("the run to succeed", lambda: read_json(f"{root}/{run}/run.json")["state"] == "SUCCEEDED", 400)

    expected = {s: v[0] for s, v in losses(reference).items()}
    logged = losses(metrics(root, run))
    assert sorted(logged) == list(range(1, 17))
    for step, values in logged.items():
        assert values == pytest.approx([expected[step]] * len(values), rel=1e-4), step
    state = status(ray_cluster, root, run)
    sizes = [(a.get("resized_from"), a["world_size"]) for a in state["attempts"]]
    assert sizes == [(None, 2), (2, 1), (1, 2)], state["attempts"]
    shrink, grow = state["attempts"][0], state["attempts"][1]
    assert shrink["outcome"] == "FAILED" and shrink["cause"]["lost_node"] == lost, shrink
    assert grow["outcome"] == "RESTARTED" and "grew the group from 1 to 2 workers" in grow["cause"]["summary"]
    assert [a["restored_step"] for a in state["attempts"]] == [None, 4, 8], state["attempts"]
    text = kiln_at(ray_cluster, "status", run, "--storage-root", root).stdout
    assert "1 workers via ray (resized from 2 workers)" in text and "2 workers via ray (resized from 1 workers)" in text


def test_a_sweep_submitted_to_the_cluster_runs_its_driver_as_a_ray_job_and_its_trials_at_once(ray_cluster, s3):
    """`kiln sweep --address`: the sweep's driver is Ray job kiln-<sweep>; its trials are ordinary runs on S3."""
    from tests.helpers import TINY

    root, sweep = s3_root(s3), f"sw-{uuid.uuid4().hex[:6]}"
    trial = [*TINY, "model.n_layer=1", "train.max_steps=10", "train.eval_every=5", "cluster.num_workers=1"]
    args = ["sweep", "--address", ray_cluster.address, *trial, "tracker=none", "optim.lr=1e-3,3e-3"]
    done = kiln_at(ray_cluster, *args, f"sweep.id={sweep}", f"storage.root={root}", "--follow")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"sweep {sweep} submitted to {ray_cluster.address} as Ray job kiln-{sweep}" in done.stdout
    assert "2 trial(s) to run, 2 at a time (grid)" in done.stdout  # the driver's log, streamed
    result = kiln_at(ray_cluster, "sweep", "status", sweep, "--json", "--storage-root", root)
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["state"] == "FINISHED" and view["job_id"] == f"kiln-{sweep}"
    assert [(t["run_id"], t["state"], t["step"]) for t in view["trials"]] == [
        (f"{sweep}-1", "SUCCEEDED", 10),
        (f"{sweep}-2", "SUCCEEDED", 10),
    ]
    assert view["best"] in {f"{sweep}-1", f"{sweep}-2"}
    assert read_json(f"{root}/sweeps/{sweep}/sweep.json")["cluster_address"] == ray_cluster.address
    # Each trial ran on the cluster: its worker recorded a cluster node, not this test's machine alone.
    assert events(root, f"{sweep}-1", "started")[0]["ranks"][0]["node_id"]
