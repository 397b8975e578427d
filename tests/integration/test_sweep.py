"""Sweeps as users run them: a grid on the embedded Ray, its driver killed midway and resumed, Optuna with ASHA,
`kiln sweep stop`, and a bad point refused before anything starts.

Each trial is a 1-worker tiny run; the embedded Ray has this machine's 2 CPUs, so 2 trials run at once.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.failpoints import Failpoints
from tests.helpers import TINY, kiln, torchrun
from tests.integration.ft_harness import finish, kill_tree, losses, output, start_kiln, wait_for, worker_pid

pytestmark = pytest.mark.timeout(900)

# 1-worker trials, checkpointed every step (a kill lands midway, and a resume restores an exact step).
TRIAL = [
    *TINY,
    "model.n_layer=1",
    "train.max_steps=40",
    "train.eval_every=10",
    "train.checkpoint_every=1",
    "checkpoint.keep_last=2",
    "checkpoint.keep_every=0",
    "cluster.num_workers=1",
]
GRID = ["optim.lr=1e-3,3e-3", "model.n_layer=1,2"]  # trial 3 is optim.lr=0.003 model.n_layer=1


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def metrics(root: Path, run: str) -> list[dict]:
    return [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def committed_steps(run_dir: Path) -> list[int]:
    """Steps whose checkpoint folder holds a MANIFEST.json, oldest first."""
    folders = (run_dir / "checkpoints").glob("step_*/MANIFEST.json")
    return sorted(int(path.parent.name.removeprefix("step_")) for path in folders)


def status(root: Path, sweep: str) -> dict:
    result = kiln("sweep", "status", sweep, "--json", "--storage-root", str(root))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@dataclass
class KilledGrid:
    """The 4-point grid whose driver was killed midway and resumed (the module's one grid sweep)."""

    root: Path
    first_log: str  # what the killed driver printed
    resumed: subprocess.CompletedProcess  # `kiln sweep resume`
    finished_before: dict[int, dict | None]  # run.json of trials 1 and 2 when the driver died
    killed_at: int  # trial 3's last committed step then


@pytest.fixture(scope="module")
def grid(tmp_path_factory, cache_dir) -> KilledGrid:
    """The 4-point grid, spelled the Hydra way (`kiln train -m`), W&B offline. Trial 3 is held after its step 5
    (step 4 committed) until trials 1 and 2 have finished; then the driver dies with its Ray, and `kiln sweep
    resume` finishes the sweep."""
    root = tmp_path_factory.mktemp("sweep-grid")
    points = Failpoints(root / "fp", "loop.after_step(run=grid-3,step=5,rank=0)=pause")
    args = ["train", "-m", *TRIAL, *GRID, "tracker=wandb", "sweep.id=grid", f"storage.root={root}"]
    driver = start_kiln(*args, log=root / "sweep.log", env=points.env)
    points.wait("loop.after_step", proc=driver)

    def trials_1_and_2_done() -> bool:
        done = [read(root / f"grid-{n}" / "run.json") for n in (1, 2)]
        return all(d and d["state"] == "SUCCEEDED" for d in done)

    wait_for("trials 1 and 2 to finish", trials_1_and_2_done, proc=driver)
    kill_tree(driver.pid)  # the driver's machine dies: the driver and the Ray it started
    finished_before = {n: read(root / f"grid-{n}" / "run.json") for n in (1, 2)}
    killed_at = committed_steps(root / "grid-3")[-1]
    lost = status(root, "grid")
    assert lost["state"] == "DRIVER_LOST" and "kiln sweep resume grid" in lost["resume_command"]
    resumed = kiln("sweep", "resume", "grid", "--storage-root", str(root), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-2000:]
    return KilledGrid(root, (root / "sweep.log").read_text(), resumed, finished_before, killed_at)


def test_a_grid_runs_two_trials_at_a_time_and_marks_the_trial_with_the_lowest_final_val_loss(grid):
    root = grid.root
    view = status(root, "grid")
    assert view["sweep_id"] == "grid" and view["state"] == "FINISHED"
    assert [t["run_id"] for t in view["trials"]] == ["grid-1", "grid-2", "grid-3", "grid-4"]
    assert [t["overrides"] for t in view["trials"]] == [
        ["optim.lr=0.001", "model.n_layer=1"],
        ["optim.lr=0.001", "model.n_layer=2"],
        ["optim.lr=0.003", "model.n_layer=1"],
        ["optim.lr=0.003", "model.n_layer=2"],
    ]
    assert {t["state"] for t in view["trials"]} == {"SUCCEEDED"} and {t["step"] for t in view["trials"]} == {40}
    evaluations = {
        t["run_id"]: [r["val/loss"] for r in metrics(root, t["run_id"]) if "val/loss" in r] for t in view["trials"]
    }
    final = {run: values[-1] for run, values in evaluations.items()}
    assert view["best"] == min(final, key=final.get)
    for trial in view["trials"]:
        every = [r["val/loss"] for r in metrics(root, trial["run_id"]) if "val/loss" in r]
        assert trial["best_val_loss"] == pytest.approx(min(every))
    # Each trial is an ordinary run: its config says its point, and it trained with its own overrides.
    config = (root / "grid-3" / "config.yaml").read_text()
    assert "lr: 0.003" in config and "n_layer: 1" in config
    # 2 trials at a time on 2 CPUs: the sweep said so and trial 3 started only after one of 1, 2 ended.
    assert "4 trial(s) to run, 2 at a time (grid)" in grid.first_log
    sweep = read(root / "sweeps" / "grid" / "sweep.json")
    assert sweep is not None and sweep["max_concurrent"] == 2 and sweep["points"] == view_points(view)
    text = grid.first_log
    assert text.index("trial 3 started") > min(text.index("trial 1 SUCCEEDED"), text.index("trial 2 SUCCEEDED"))
    # The table marks the best trial.
    table = kiln("sweep", "status", "grid", "--storage-root", str(root)).stdout
    best_line = next(line for line in table.splitlines() if view["best"] in line)
    assert best_line.lstrip().startswith("*")


def test_kiln_plot_of_a_sweep_overlays_its_trials_and_kiln_compare_sets_them_side_by_side(grid, tmp_path):
    from PIL import Image

    root = grid.root
    result = kiln("plot", "grid", "--out", str(tmp_path), "--storage-root", str(root))
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "loss.png") as image:
        series = json.loads(image.text["Description"])["series"]
    trials = [f"grid-{n}" for n in range(1, 5)]
    assert [(s["run"], s["metric"]) for s in series if s["metric"] == "val/loss"] == [(t, "val/loss") for t in trials]
    compared = json.loads(kiln("compare", "grid", "--json", "--storage-root", str(root)).stdout)
    for trial in trials:
        every = [r["val/loss"] for r in metrics(root, trial) if "val/loss" in r]
        assert compared["val/loss"][trial]["best"] == min(every)


def view_points(view: dict) -> list[list[str]]:
    return [t["overrides"] for t in view["trials"]]


def test_each_trial_is_a_wandb_run_in_the_sweeps_group(grid):
    from tests.wandb_reader import records

    root = grid.root
    files = list((root / "grid-2" / "wandb").glob("offline-run-*/run-grid-2.wandb"))
    assert len(files) == 1
    runs = [r.run for r in records(files[0]) if r.HasField("run")]
    assert runs and runs[0].run_group == "grid"


def test_a_killed_sweep_driver_resumes_finished_trials_untouched_and_the_midway_trial_from_its_checkpoint(
    grid, tmp_path
):
    root = grid.root
    assert grid.killed_at == 4
    assert "2 trial(s) ended (left as they are)" in grid.resumed.stdout
    view = status(root, "grid")
    assert view["state"] == "FINISHED" and {t["state"] for t in view["trials"]} == {"SUCCEEDED"}
    for n in (1, 2):  # finished trials were not run again
        assert read(root / f"grid-{n}" / "run.json") == grid.finished_before[n]
    third = read(root / "grid-3" / "run.json")
    assert third is not None and len(third["attempts"]) == 2
    restored = third["attempts"][1].get("restored_step")
    assert restored is not None and restored >= grid.killed_at - 1, third["attempts"][1]
    # Trial 3's losses, first try and re-run steps alike, equal an uninterrupted run of its point (1 process, as
    # the trial's 1 worker).
    point = next(t["overrides"] for t in view["trials"] if t["run_id"] == "grid-3")
    keys = {o.split("=")[0] for o in point}
    trial = [o for o in TRIAL if o.split("=")[0] not in keys]
    torchrun(*trial, *point, "tracker=none", "run.id=grid-3", f"storage.root={tmp_path}", nproc=1)
    logged = losses(metrics(root, "grid-3"))
    expected = {s: v[0] for s, v in losses(metrics(tmp_path, "grid-3")).items()}
    assert sorted(logged) == sorted(expected) == list(range(1, 41))
    for step, values in logged.items():
        assert values == [expected[step]] * len(values), (step, values, expected[step])


def test_optuna_with_asha_prunes_trials_at_their_rung_with_a_committed_checkpoint(tmp_path, cache_dir):
    """4 Optuna trials, one at a time, under ASHA (rungs at steps 10 and 20 of 40): each trial is held just
    after a rung until ASHA has decided on that rung's result, so a pruned trial stops at that rung + 1."""
    root, rungs = tmp_path / "runs", (10, 20)
    holds = [f"loop.after_step(run=opt-{n},step={rung + 1},rank=0)=pause" for n in range(1, 5) for rung in rungs]
    decided = [f"sweep.asha_decided(trial={n},step={rung})=sleep(0)" for n in range(1, 5) for rung in rungs]
    points = Failpoints(tmp_path / "fp", *holds, *decided)
    args = [*TINY, "model.n_layer=1", "train.max_steps=40", "train.eval_every=10", "train.checkpoint_every=200"]
    args += ["cluster.num_workers=1", "tracker=none", "optim.lr=tag(log,interval(1e-5,1e-2))"]
    # One trial at a time, so which trials ASHA prunes depends only on the sampler's seed, not on
    # which of two concurrent trials reaches a rung first.
    args += ["sweep.search=optuna", "sweep.num_trials=4", "sweep.early_stop=asha", "sweep.max_concurrent=1"]
    driver = start_kiln(
        "sweep", *args, "sweep.id=opt", f"storage.root={root}", log=tmp_path / "sweep.log", env=points.env
    )
    pruned_at: dict[str, int] = {}
    for n in range(1, 5):
        run = f"opt-{n}"
        for rung in rungs:
            points.wait("loop.after_step", proc=driver, run=run, step=rung + 1)
            points.wait("sweep.asha_decided", proc=driver, trial=n, step=rung)
            asked_to_stop = (root / run / "STOP").exists()  # ASHA's prune is written before it says it decided
            points.release("loop.after_step", run=run, step=rung + 1, rank=0)
            if asked_to_stop:
                pruned_at[run] = rung
                break
    assert finish(driver, timeout=600) == 0, output(driver)
    view = status(root, "opt")
    assert [t["run_id"] for t in view["trials"]] == [f"opt-{n}" for n in range(1, 5)]
    states = {t["run_id"]: t["state"] for t in view["trials"]}
    assert pruned_at and {run for run, state in states.items() if state == "PRUNED"} == set(pruned_at), states
    log = (tmp_path / "sweep.log").read_text()
    for run, rung in pruned_at.items():
        record = read(root / run / "run.json")
        assert record["step"] == record["checkpoint"]["step"] == rung + 1, (run, record)
        assert (root / run / "checkpoints" / f"step_{rung + 1:06d}" / "MANIFEST.json").exists()
        assert f"pruned by the sweep's ASHA scheduler at step {rung}" in log
    assert {t["state"] for t in view["trials"]} <= {"SUCCEEDED", "PRUNED"}
    assert view["best"] in {t["run_id"] for t in view["trials"] if t["state"] == "SUCCEEDED"}
    lrs = [float(t["overrides"][0].split("=")[1]) for t in view["trials"]]
    assert all(1e-5 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 4


def test_kiln_sweep_stop_commits_running_trials_and_resume_finishes_the_sweep(tmp_path, cache_dir):
    root = tmp_path / "runs"
    longer = [o for o in TRIAL if not o.startswith(("train.max_steps", "train.checkpoint_every", "train.eval_every"))]
    longer += ["train.max_steps=60", "train.checkpoint_every=50", "train.eval_every=30"]
    args = ["sweep", *longer, "optim.lr=1e-3,3e-3", "sweep.max_concurrent=1", "tracker=none", "sweep.id=halt"]
    # Trial 1 is held after its step 5 while `kiln sweep stop` asks it to stop, and released once it was asked.
    points = Failpoints(tmp_path / "fp", "loop.after_step(run=halt-1,step=5,rank=0)=pause")
    driver = start_kiln(*args, f"storage.root={root}", log=tmp_path / "sweep.log", env=points.env)
    points.wait("loop.after_step", proc=driver)
    stop = kiln("sweep", "stop", "halt", "--storage-root", str(root))
    assert stop.returncode == 0 and "halt-1" in stop.stdout, stop.stdout + stop.stderr
    wait_for("trial 1's STOP request", lambda: (root / "halt-1" / "STOP").exists(), proc=driver)
    points.release("loop.after_step")
    assert finish(driver) == 3, output(driver)
    view = status(root, "halt")
    assert view["state"] == "STOPPED"
    assert [t["state"] for t in view["trials"]] == ["PREEMPTED", "NOT_STARTED"]
    first = read(root / "halt-1" / "run.json")
    assert first["checkpoint"]["step"] == first["step"] < 60
    resumed = kiln("sweep", "resume", "halt", "--storage-root", str(root), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert [t["state"] for t in status(root, "halt")["trials"]] == ["SUCCEEDED", "SUCCEEDED"]


def test_a_bad_point_is_named_and_nothing_runs(tmp_path):
    root = tmp_path / "runs"
    result = kiln("sweep", "train.max_steps=4", "optim.lr=0.1,-1", f"storage.root={root}")
    assert result.returncode == 2
    assert "point 2 (optim.lr=-1): optim.lr must be > 0" in result.stderr and "nothing was started" in result.stderr
    assert not root.exists() or not any(root.iterdir())
    multirun = kiln("train", "--multirun", "train.max_steps=4", "optim.lr=0.1,-1", f"storage.root={root}")
    assert multirun.returncode == 2 and "point 2 (optim.lr=-1)" in multirun.stderr


def test_a_trial_whose_actor_dies_is_restarted_and_a_trial_that_fails_stops_no_other(tmp_path, cache_dir):
    """Trial 1's actor and worker are SIGKILLed at step 6 (its step-5 checkpoint committed): Tune restarts it and
    its run goes on from step 5. Trial 2 diverges (lr=1e6): it fails once, is not restarted, and is never the best."""
    import os
    import signal

    root = tmp_path / "runs"
    short = [*TINY, "model.n_layer=1", "train.max_steps=10", "train.eval_every=5", "train.checkpoint_every=5"]
    diverging = ["optim.lr=1e-3,1e6", "cluster.max_failures=0", "tracker=none", "sweep.id=div"]
    points = Failpoints(tmp_path / "fp", "loop.after_step(run=div-1,step=6,rank=0)=pause")
    args = ["sweep", *short, "cluster.num_workers=1", *diverging, f"storage.root={root}"]
    driver = start_kiln(*args, log=tmp_path / "sweep.log", env=points.env)
    points.wait("loop.after_step", proc=driver)
    first = read(root / "div-1" / "run.json")
    assert first is not None and first["driver"]["command"].startswith("kiln sweep div ")
    # The trial's node dies: its actor and its run's worker together, so no worker outlives its owner long enough
    # to commit a checkpoint of its own (on a loaded machine one did, at step 7, as a preempted worker would).
    held_worker = worker_pid(str(root), "div-1", rank=0)
    os.kill(first["driver"]["pid"], signal.SIGKILL)
    os.kill(held_worker, signal.SIGKILL)
    points.release("loop.after_step")
    assert finish(driver, timeout=600) == 0, output(driver)
    log = (tmp_path / "sweep.log").read_text()  # all of it: the trials' lines come in either order
    assert "trial 1's actor died (1 of 2 restarts, sweep.trial_restarts); restarting it" in log, log
    assert "trial 2 FAILED" in log and "FloatingPointError: loss is nan" in log, log
    assert "Traceback" not in log and "Trial task failed" not in log, log  # Kiln's line, not Ray's traceback
    view = status(root, "div")
    assert view["state"] == "FINISHED"
    assert [(t["run_id"], t["state"]) for t in view["trials"]] == [("div-1", "SUCCEEDED"), ("div-2", "FAILED")]
    assert view["best"] == "div-1"
    attempts = (read(root / "div-1" / "run.json") or {})["attempts"]
    assert [a["restored_step"] for a in attempts] == [None, 5], attempts
    assert len((read(root / "div-2" / "run.json") or {})["attempts"]) == 1
