"""A run that dies anywhere comes back exactly where it was, from S3, without a human editing anything.

Every run here lives on the real local S3 server (moto, through s3fs), runs on an embedded Ray with 2
workers, and is interrupted by real signals at the steps failpoints name. Checkpointing every other step
does not change the math, so each run's losses are compared bit for bit with the same strategy's uninterrupted
torchrun run.
"""

from __future__ import annotations

import os
import signal

import pytest

from orchestrator.cli import main as cli_main
from tests.failpoints import Failpoints
from tests.helpers import kiln
from tests.integration.ft_harness import (
    EVERY_OTHER_STEP,
    assert_same_losses,
    committed_steps,
    events,
    finish,
    kill_tree,
    losses,
    metrics,
    read_json,
    reference_rows,
    s3_client,
    s3_root,
    start_kiln,
    wait_for,
    worker_pid,
)

pytestmark = pytest.mark.slow


def test_a_ddp_run_on_a_flaky_store_survives_a_kill_mid_save_exactly(s3, trained_runs, tmp_path):
    """Through a proxy that 503s and drops requests, SIGKILL rank 1 while its step-10 files upload."""
    from tests.faulty_proxy import FaultyProxy

    root = s3_root(s3)
    killed: list[int] = []

    def kill_rank1_during_its_step10_upload(method: str, path: str) -> None:
        if method == "PUT" and "/k/checkpoints/step_000010/extra/rank_00001.pt" in path and not killed:
            killed.append(worker_pid(root, "k", rank=1))
            os.kill(killed[0], signal.SIGKILL)

    with FaultyProxy(
        os.environ["AWS_ENDPOINT_URL"],
        fail_rate=0.05,
        drop_rate=0.02,
        seed=7,
        delay_s=3.0,
        delay_path=r"step_000010/extra/rank_00001",
        on_request=kill_rank1_during_its_step10_upload,
    ) as proxy:
        result = kiln(
            "train",
            *[o for o in EVERY_OTHER_STEP if o != "tracker=none"],
            "tracker=wandb",
            "strategy=ddp",
            "run.id=k",
            f"storage.root={root}",
            env={"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_SECRET_ACCESS_KEY": "testing"},
            timeout=500,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert proxy.counts.failed > 0 and proxy.counts.dropped > 0  # the store really was flaky
    assert killed, "the kill during the step-10 upload never happened"
    reference = reference_rows(trained_runs, "ddp")
    assert_same_losses(metrics(root, "k"), reference)

    record = read_json(f"{root}/k/run.json")
    assert record["state"] == "SUCCEEDED" and record["step"] == 20
    first, second = record["attempts"]
    assert first["outcome"] == "FAILED" and first["cause"]["rank"] == 1 and first["cause"]["pid"] == killed[0]
    assert "worker process died" in first["cause"]["summary"]
    assert second["outcome"] == "SUCCEEDED" and second["restored_step"] == 8  # step 10 never committed
    # Retention: the newest 3 and every 10th step are kept, every one verifies, no leftover remains.
    assert committed_steps(root, "k") == [10, 16, 18, 20]
    assert len(s3_client().ls(f"{root}/k/checkpoints".removeprefix("s3://"), detail=False)) == 4
    from trainers.checkpoint.store import verify

    for step in committed_steps(root, "k"):
        assert verify(f"{root}/k/checkpoints/step_{step:06d}")["step"] == step
    logs = s3_client().cat_file(f"{root}/k/logs/worker_0.log".removeprefix("s3://")).decode()
    assert "retrying" in logs  # transient store errors were retried, and said so

    # Everything the run wrote is on S3, nothing in the working directory, no secret anywhere.
    fs = s3_client()
    base = f"{root}/k".removeprefix("s3://")
    found = {path[len(base) + 1 :] for path in fs.find(base)}
    for expected in (
        "run.json",
        "config.yaml",
        "metrics.jsonl",
        "tokenizer/tokenizer.json",
        "checkpoints/step_000020/MANIFEST.json",
        "logs/worker_0.log",
        "logs/worker_1.log",
    ):
        assert expected in found, (expected, sorted(found)[:40])
    assert any(p.startswith("events/") for p in found)
    assert any(p.startswith("wandb/") and p.endswith("run-k.wandb") for p in found)
    assert b"testing" not in fs.cat_file(f"{base}/config.yaml")
    status = kiln("status", "k", "--storage-root", root)
    assert "attempt 1:" in status.stdout and "-> FAILED: rank 1's worker process died" in status.stdout
    assert f"pid {killed[0]}" in status.stdout and "from step 8" in status.stdout, status.stdout


def test_zero3_worker_sigkill_with_async_uploads_restarts_with_identical_losses(s3, trained_runs, tmp_path):
    """Rank 1 is SIGKILLed right after its step-10 checkpoint commits (a failpoint, so always at step 10)."""
    root = s3_root(s3)
    points = Failpoints(tmp_path / "fp", "checkpoint.committed(step=10,rank=1)=kill")
    run = start_kiln(
        "train",
        *EVERY_OTHER_STEP,
        "checkpoint.async=true",
        "strategy=zero3",
        "run.id=z",
        f"storage.root={root}",
        log=tmp_path / "train.log",
        env=points.env,
    )
    assert finish(run) == 0, (tmp_path / "train.log").read_text()[-3000:]
    victim = points.arrivals("checkpoint.committed")[0]["pid"]
    assert_same_losses(metrics(root, "z"), reference_rows(trained_runs, "zero3"))
    record = read_json(f"{root}/z/run.json")
    assert record["state"] == "SUCCEEDED" and record["checkpoint"]["step"] == 20  # the last upload finished
    first, second = record["attempts"]
    assert first["cause"]["rank"] == 1 and first["cause"]["pid"] == victim
    assert second["restored_step"] == 10 and second["outcome"] == "SUCCEEDED"
    assert committed_steps(root, "z") == [10, 16, 18, 20]


def test_fsdp_survives_a_worker_kill_then_the_driver_dies_and_kiln_resume_reshards_to_one_worker(
    s3, trained_runs, tmp_path
):
    """Async uploads; Ray restarts the group after a SIGKILL; then the driver and its Ray are killed."""
    root = s3_root(s3)
    args = [o for o in EVERY_OTHER_STEP if o != "tracker=none"]
    points = Failpoints(
        tmp_path / "fp", "checkpoint.committed(step=6,rank=1)=kill", "loop.after_step(step=15,rank=0)=pause"
    )
    run = start_kiln(
        "train",
        *args,
        "tracker=wandb",
        "checkpoint.async=true",
        "strategy=fsdp",
        "run.id=f",
        f"storage.root={root}",
        log=tmp_path / "train.log",
        # Rank 1 dies once its step-6 checkpoint commits; the restarted group is held after step 15 (step 12's
        # async upload is committed by then: step 14's save waited for it), and the driver dies there.
        env=points.env,
    )
    held = points.wait("loop.after_step", proc=run)
    assert held["step"] == 15 and len(events(root, "f", "started")) == 2
    assert points.arrivals("checkpoint.committed")[0]["step"] == 6
    config_before = s3_client().cat_file(f"{root}/f/config.yaml".removeprefix("s3://"))
    kill_tree(run.pid)  # the driver and the Ray it started
    before = metrics(root, "f")
    reference = reference_rows(trained_runs, "fsdp")
    assert_same_losses(before, reference, steps=range(1, max(losses(before)) + 1))

    rejected = kiln("resume", "f", "optim.lr=0.5", "--storage-root", root)
    assert rejected.returncode == 2 and "cannot override 'optim.lr' when resuming" in rejected.stderr
    # At once, without --force: the driver's pid is gone, so `kiln resume` knows it is dead.
    resumed = kiln("resume", "f", "cluster.num_workers=1", "--storage-root", root, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    record = read_json(f"{root}/f/run.json")
    assert record["run_id"] == "f" and record["state"] == "SUCCEEDED" and record["step"] == 20
    assert [a["outcome"] for a in record["attempts"]] == ["FAILED", "DRIVER_LOST", "SUCCEEDED"]
    last = record["attempts"][-1]
    assert last["world_size"] == 1 and last["resharded_from"] == 2 and last["restored_step"] >= 12
    assert s3_client().cat_file(f"{root}/f/config.yaml".removeprefix("s3://")) == config_before
    after = losses(metrics(root, "f"))
    assert sorted(after) == list(range(1, 21))
    expected = {s: v[0] for s, v in losses(reference).items()}
    for step in range(last["restored_step"] + 1, 21):
        # One worker draws other dropout masks than two, so the curve continues close, not bit-equal
        # (exact resharding of weights and optimizer state: tests/unit/test_checkpoint.py and
        # tests/distributed/test_zero_reshard.py).
        assert after[step][-1] == pytest.approx(expected[step], rel=0.05), step

    from tests.wandb_reader import history, records

    fs = s3_client()
    wandb_files = [p for p in fs.find(f"{root}/f/wandb".removeprefix("s3://")) if p.endswith("run-f.wandb")]
    assert wandb_files, "the resumed attempt's W&B files were not copied to the run folder"
    local = tmp_path / "resumed.wandb"
    fs.get(sorted(wandb_files)[-1], str(local))
    runs = [r.run for r in records(local) if r.WhichOneof("record_type") == "run"]
    assert runs and all(r.run_id == "f" for r in runs)  # the same W&B run, resumed
    assert history(local)[0]["_step"] == last["restored_step"] + 1


def test_a_hang_then_sigterm_twice_and_kiln_stop_through_a_corrupt_checkpoint_stay_exact(s3, trained_runs, tmp_path):
    """Freeze a rank; SIGTERM a worker; corrupt the newest checkpoint; SIGTERM the driver; `kiln stop`."""
    root = s3_root(s3)
    grace = 60

    def stop_held(points: Failpoints, ask) -> None:
        """Ask the held run to stop; release it once its STOP request is on the store (the workers read it)."""
        ask()
        wait_for("the STOP request", lambda: s3_client().exists(f"{root}/p/STOP".removeprefix("s3://")))
        points.release("loop.after_step")

    def preempt(proc, interrupt) -> int:
        interrupt()
        assert finish(proc) == 3, proc.log_path.read_text()[-3000:]  # PREEMPTED, resumable
        record = read_json(f"{root}/p/run.json")
        assert record["state"] == "PREEMPTED", record
        done = events(root, "p", "finished")[-1]
        assert done["state"] == "PREEMPTED" and done["step"] in committed_steps(root, "p")
        assert read_json(f"{root}/p/checkpoints/step_{done['step']:06d}/MANIFEST.json")["step"] == done["step"]
        status = kiln("status", "p", "--storage-root", root)
        assert f"resume: kiln resume p --storage-root {root}" in status.stdout
        return done["step"]

    # Rank 1 hangs after step 3 and rank 0 waits in a collective forever: the step watchdog fails it with the
    # rank and step named, and Ray restarts the group from step 2. The new group is held after step 6, where
    # its rank 1 gets SIGTERM. (Failpoints: each fires once, so the restarted group passes step 3.)
    points = Failpoints(tmp_path / "fp1", "loop.after_step(step=3,rank=1)=hang", "loop.after_step(step=6,rank=1)=pause")
    run = start_kiln(
        "train",
        *EVERY_OTHER_STEP,
        "strategy=ddp",
        "train.step_timeout_s=8",
        "run.id=p",
        f"storage.root={root}",
        f"checkpoint.preempt_grace_s={grace}",
        log=tmp_path / "1.log",
        env=points.env,
    )
    hung = points.wait("loop.after_step", proc=run, step=3)
    try:
        held = points.wait("loop.after_step", proc=run, step=6)
    finally:
        kill_tree(hung["pid"])
    assert len(events(root, "p", "started")) == 2 and held["pid"] == worker_pid(root, "p", rank=1)

    def sigterm_held_worker() -> None:
        os.kill(held["pid"], signal.SIGTERM)
        points.release("loop.after_step")

    step = preempt(run, sigterm_held_worker)
    assert "rank 1: SIGTERM received by a worker" in events(root, "p", "finished")[-1]["reason"]

    # Flip bytes in the newest checkpoint: the resume must skip it for the one before, and say so.
    before = max(s for s in committed_steps(root, "p") if s < step)
    fs = s3_client()
    shard = f"{root}/p/checkpoints/step_{step:06d}/shards/__0_0.distcp".removeprefix("s3://")
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    # The resume is held after its second step; the driver gets SIGTERM there and writes the STOP request.
    points = Failpoints(tmp_path / "fp2", f"loop.after_step(step={step + 1},rank=0)=pause")
    run = start_kiln("resume", "p", "--storage-root", root, log=tmp_path / "2.log", env=points.env)
    points.wait("loop.after_step", proc=run)
    corrupted, step = step, preempt(run, lambda: stop_held(points, lambda: os.kill(run.pid, signal.SIGTERM)))
    assert "driver received SIGTERM" in events(root, "p", "finished")[-1]["reason"]
    record = read_json(f"{root}/p/run.json")
    resumed = record["attempts"][2]
    assert resumed["restored_step"] == before
    assert f"step_{corrupted:06d}" in resumed["skipped_checkpoints"][0]
    assert any("fail verification" in note and f"step {before}" in note for note in record["notes"])
    log0 = fs.cat_file(f"{root}/p/logs/worker_0.log".removeprefix("s3://")).decode()
    assert "skipping checkpoint that fails verification" in log0

    points = Failpoints(tmp_path / "fp3", f"loop.after_step(step={step + 1},rank=0)=pause")
    run = start_kiln("resume", "p", "--storage-root", root, log=tmp_path / "3.log", env=points.env)
    points.wait("loop.after_step", proc=run)
    stopper = {}
    # `kiln stop`'s own main(), in this process, while the third resume is held after its first step.
    step = preempt(
        run, lambda: stop_held(points, lambda: stopper.update(r=cli_main(["stop", "p", "--storage-root", root])))
    )
    assert stopper["r"] == 0 and "kiln stop" in events(root, "p", "finished")[-1]["reason"]

    record = read_json(f"{root}/p/run.json")
    assert [a["outcome"] for a in record["attempts"]] == ["HUNG", "PREEMPTED", "PREEMPTED", "PREEMPTED"]
    hung = record["attempts"][0]["cause"]
    assert hung["rank"] == 0 and "train.step_timeout_s=8" in hung["summary"]
    status = kiln("status", "p", "--storage-root", root)
    assert "-> HUNG: rank 0 hung" in status.stdout
    # Every loss logged across the four attempts, re-runs included, is the uninterrupted run's.
    assert_same_losses(metrics(root, "p"), reference_rows(trained_runs, "ddp"), steps=range(1, step + 1))
