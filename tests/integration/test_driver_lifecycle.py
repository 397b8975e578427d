"""A driver stopped the way machines stop it ends its run cleanly, and one `kiln resume` continues it.

`timeout`, systemd and Kubernetes send SIGTERM to the driver's whole process group; an on-call
engineer resumes right after a driver was lost. Neither may need `--force` or leave a run RUNNING.
"""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from tests.failpoints import Failpoints
from tests.helpers import LLAMA_TINY, kiln
from tests.integration.ft_harness import finish, kill_tree, start_kiln, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

# Long enough that no signal lands after the end; the only checkpoint is the one the stop commits.
RUN = [*LLAMA_TINY, "tracker=none", "train.max_steps=1000", "train.checkpoint_every=1000", "train.eval_every=1000"]


def trained_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return sum('"train/loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def test_a_process_group_sigterm_ends_the_run_preempted_and_kiln_resume_needs_no_force(cache_dir, tmp_path):
    root = tmp_path / "runs"
    run_dir = root / "g"
    points = Failpoints(tmp_path / "fp", "loop.after_step(step=3,rank=0)=pause")
    run = start_kiln("train", *RUN, "run.id=g", f"storage.root={root}", log=tmp_path / "train.log", env=points.env)
    try:
        stop_by_process_group_sigterm(run, points, run_dir, tmp_path)
    finally:
        kill_tree(run.pid)

    stopped = json.loads((run_dir / "run.json").read_text())["checkpoint"]["step"]
    resumed = kiln("resume", "g", f"train.max_steps={stopped + 3}", "--storage-root", str(root), timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["state"] == "SUCCEEDED" and record["step"] == stopped + 3
    assert [a["outcome"] for a in record["attempts"]] == ["PREEMPTED", "SUCCEEDED"]
    assert record["attempts"][-1]["restored_step"] == stopped


def stop_by_process_group_sigterm(run, points, run_dir, tmp_path) -> None:
    """While the driver runs, `kiln resume` refuses; then SIGTERM its group: PREEMPTED, nothing left."""
    points.wait("loop.after_step", proc=run)  # the run is held after step 3
    root = run_dir.parent

    busy = kiln("resume", "g", "--storage-root", str(root))
    assert busy.returncode == 2 and f"pid {run.pid}" in busy.stderr, busy.stderr
    assert "kiln stop g" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1

    family = psutil.Process(run.pid).children(recursive=True)  # the embedded Ray and its workers
    os.killpg(run.pid, signal.SIGTERM)  # what `timeout`, systemd and Kubernetes do
    wait_for("the driver's STOP request", lambda: (run_dir / "STOP").exists(), proc=run)
    points.release("loop.after_step")
    # Ray's own processes live in a session of their own: the signal reached the driver alone, which ends
    # the run PREEMPTED with a checkpoint (before that fix, Ray died with the group and the driver hung).
    assert finish(run, timeout=120) == 3, (tmp_path / "train.log").read_text()[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["state"] == "PREEMPTED" and record["attempts"][-1]["outcome"] == "PREEMPTED"
    step = record["checkpoint"]["step"]
    assert (
        step == record["attempts"][-1]["final_step"] >= 3
        and (run_dir / "checkpoints" / f"step_{step:06d}" / "MANIFEST.json").exists()
    )
    assert not (run_dir / "STOP").exists()  # served: nothing is left to stop the next attempt
    _gone, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, [p.pid for p in alive]  # no Ray process outlives its driver


def test_more_workers_than_the_embedded_ray_has_cpus_fail_in_one_line_and_register_no_run(cache_dir, tmp_path):
    import multiprocessing

    workers = 32 * multiprocessing.cpu_count()
    result = kiln(
        "train",
        *LLAMA_TINY,
        "tracker=none",
        f"cluster.num_workers={workers}",
        f"train.global_batch={4 * workers}",
        "run.id=w",
        f"storage.root={tmp_path}",
        timeout=120,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for words in (f"cluster.num_workers={workers}", "cluster.cpus_per_worker=1", "CPUs", "room for"):
        assert words in result.stderr, (words, result.stderr)
    assert not (tmp_path / "w").exists()  # refused before the run was registered: the id stays free
