"""A sweep's record and the decisions made over it: what a resume runs, which trial is best, how a sweep ends,
how many trials fit, and what `kiln sweep status` shows of hand-made sweep.json and run folders."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from rich.console import Console

from orchestrator.cli import parser
from orchestrator.cli.sweep import cmd_sweep_status, print_status, status_json, sweep_argv
from orchestrator.config import UsageError, compose_config
from orchestrator.run.liveness import DriverIdentity, this_host
from orchestrator.run.registry import RunRecord, RunRegistry, now
from orchestrator.sweep import record as sweeps
from orchestrator.sweep.driver import fitting_trials
from orchestrator.sweep.record import (
    NOT_STARTED,
    ResumePlan,
    SweepRecord,
    SweepState,
    TrialEntry,
    UnknownSweep,
    best_trial,
    ended_state,
    plan_resume,
    trial_run_id,
    trial_summary,
)
from orchestrator.sweep.settings import SweepConfig
from orchestrator.sweep.trial import PRUNED_EVENT, was_pruned
from trainers.run.state import RunState

GONE_PID = 2**22 + 1  # above Linux's largest pid_max: no process ever has it
POINTS = [["optim.lr=0.1"], ["optim.lr=0.2"], ["optim.lr=0.3"], ["optim.lr=0.4"]]


def a_sweep(root: str, sweep_id: str = "lr", **changes) -> SweepRecord:
    """A grid sweep over four learning rates, as `kiln sweep` records it before any trial runs."""
    fields = {
        "sweep_id": sweep_id,
        "command": "kiln sweep train.max_steps=4 optim.lr=0.1,0.2,0.3,0.4",
        "overrides": ["train.max_steps=4", "optim.lr=0.1,0.2,0.3,0.4"],
        "storage_root": root,
        "search": "grid",
        "settings": SweepConfig(id=sweep_id).as_dict(),
        "fixed": ["train.max_steps=4"],
        "swept": ["optim.lr=0.1,0.2,0.3,0.4"],
        "points": [list(p) for p in POINTS],
        "trials": [TrialEntry(n, trial_run_id(sweep_id, n), list(p)) for n, p in enumerate(POINTS, 1)],
    }
    return SweepRecord(**(fields | changes))


def trial(n: int, last_metric: float | None, best_val_loss: float | None = None) -> TrialEntry:
    return TrialEntry(n, f"lr-{n}", [f"optim.lr=0.{n}"], best_val_loss=best_val_loss, last_metric=last_metric)


# ---- what `kiln sweep resume` does with each trial ----------------------------------------------------------


def test_a_resume_continues_unfinished_runs_starts_missing_ones_and_leaves_ended_ones():
    states: dict[int, str | None] = {
        8: NOT_STARTED,
        1: RunState.SUCCEEDED,
        2: RunState.PRUNED,
        3: RunState.FAILED,
        4: RunState.PREEMPTED,
        5: RunState.STOPPED,
        6: RunState.RUNNING,  # its driver died: the run never said how it ended
        7: None,  # no run yet
    }
    assert plan_resume(states) == ResumePlan(resume=[4, 5, 6], start=[7, 8], done=[1, 2, 3])


def test_retry_failed_runs_failed_trials_again_from_their_checkpoints():
    states: dict[int, str | None] = {1: RunState.FAILED, 2: RunState.SUCCEEDED, 3: RunState.PRUNED, 4: None}
    assert plan_resume(states, retry_failed=True) == ResumePlan(resume=[1], start=[4], done=[2, 3])
    assert plan_resume({}) == ResumePlan([], [], [])


# ---- the best trial: its metric at its LAST evaluation ------------------------------------------------------


def test_the_best_trial_is_the_lowest_at_its_last_evaluation_not_its_best_ever():
    trials = [trial(1, last_metric=3.0, best_val_loss=1.0), trial(2, last_metric=2.0, best_val_loss=2.0)]
    best = best_trial(trials, "min")
    assert best is not None and best.run_id == "lr-2"


def test_with_mode_max_the_highest_wins():
    trials = [trial(1, 0.5), trial(2, 0.9), trial(3, 0.7)]
    best = best_trial(trials, "max")
    assert best is not None and best.run_id == "lr-2"
    lowest = best_trial(trials, "min")
    assert lowest is not None and lowest.run_id == "lr-1"


def test_a_tie_goes_to_the_earlier_trial():
    for mode in ("min", "max"):
        best = best_trial([trial(1, 2.0), trial(2, 1.0), trial(3, 1.0), trial(4, 2.0)], mode)
        assert best is not None and best.run_id == ("lr-2" if mode == "min" else "lr-1")


def test_trials_without_an_evaluation_are_never_best_and_zero_is_a_value():
    assert best_trial([], "min") is None
    assert best_trial([trial(1, None), trial(2, None)], "max") is None
    best = best_trial([trial(1, None), trial(2, 0.5), trial(3, 0.0)], "min")
    assert best is not None and best.run_id == "lr-3"
    best = best_trial([trial(1, -1.0), trial(2, 0.0), trial(3, None)], "max")
    assert best is not None and best.run_id == "lr-2"


def test_trial_summary_reads_the_best_val_loss_and_the_metric_at_the_last_evaluation():
    rows = [
        {"step": 1, "loss": 4.0},
        {"step": 2, "val/loss": 2.0, "val/ppl": 7.4},
        {"step": 3, "loss": 3.0},
        {"step": 4, "val/loss": 2.5, "val/ppl": 12.2},
        {"step": 5, "loss": 2.0, "val/loss": None},  # a row without an evaluation
    ]
    assert trial_summary(rows, "val/loss") == (2.0, 2.5)
    assert trial_summary(rows, "val/ppl") == (2.0, 12.2)
    assert trial_summary([{"step": 1, "loss": 4.0}], "val/loss") == (None, None)
    assert trial_summary([], "val/ppl") == (None, None)


# ---- how a sweep's driver ends it -----------------------------------------------------------------------------


def test_a_sweep_whose_trials_all_ended_is_finished_even_if_a_stop_came_late():
    ended = [RunState.SUCCEEDED, RunState.PRUNED, RunState.FAILED]
    assert ended_state(ended) == SweepState.FINISHED
    assert ended_state(ended) == SweepState.FINISHED
    assert ended_state([]) == SweepState.FINISHED


def test_a_sweep_with_a_trial_left_unfinished_is_stopped_and_resumable():
    assert ended_state([RunState.SUCCEEDED, NOT_STARTED]) == SweepState.STOPPED
    assert ended_state([RunState.SUCCEEDED, RunState.PREEMPTED]) == SweepState.STOPPED
    # not asked to stop, yet a trial never ran (the driver was cut short): resume must pick it up
    assert ended_state([RunState.SUCCEEDED, NOT_STARTED]) == SweepState.STOPPED


# ---- sweep.json -----------------------------------------------------------------------------------------------


def test_a_sweep_record_round_trips_through_sweep_json(tmp_path):
    root = str(tmp_path)
    record = a_sweep(root, max_concurrent=2, driver=DriverIdentity.here("kiln sweep lr").liveness_json())
    record.trials[0] = TrialEntry(
        1, "lr-1", ["optim.lr=0.1"], RunState.SUCCEEDED, 4, 2.0, 2.5, params={"optim.lr": 0.1}, error=None
    )
    sweeps.create(root, record)
    path = tmp_path / "sweeps" / "lr" / "sweep.json"
    assert json.loads(path.read_text())["sweep_id"] == "lr"
    assert sweeps.load(root, "lr") == record
    record.state, record.best = SweepState.FINISHED, "lr-1"
    record.trials[1].state = RunState.PRUNED
    sweeps.save(root, record)
    loaded = sweeps.load(root, "lr")
    assert loaded == record and loaded.trial(2) == record.trials[1] and loaded.trial(9) is None
    assert sweeps.sweep_ids(root) == ["lr"]


def test_a_newer_kilns_sweep_json_still_loads(tmp_path):
    data = asdict(a_sweep(str(tmp_path)))
    data["from_the_future"] = {"x": 1}
    data["trials"][0]["also_new"] = True
    folder = tmp_path / "sweeps" / "lr"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps(data))
    loaded = sweeps.load(str(tmp_path), "lr")
    assert loaded == a_sweep(str(tmp_path), created=data["created"], updated=data["updated"])


def test_creating_a_sweep_twice_is_refused_pointing_at_resume(tmp_path):
    root = str(tmp_path)
    sweeps.create(root, a_sweep(root))
    before = (tmp_path / "sweeps" / "lr" / "sweep.json").read_text()
    with pytest.raises(UsageError) as raised:
        sweeps.create(root, a_sweep(root, command="kiln sweep something else"))
    assert str(raised.value) == (
        f"sweep 'lr' already exists under {root}; choose another sweep.id, or continue it with `kiln sweep resume lr`"
    )
    assert (tmp_path / "sweeps" / "lr" / "sweep.json").read_text() == before


def test_an_unknown_sweep_is_named_with_the_sweeps_there(tmp_path):
    root = str(tmp_path)
    with pytest.raises(UnknownSweep, match=r"unknown sweep 'lr' under .*; no sweeps there yet$"):
        sweeps.load(root, "lr")
    for sweep_id in ("wd", "heads"):
        sweeps.create(root, a_sweep(root, sweep_id))
    (tmp_path / "sweeps" / "half-made").mkdir()  # no sweep.json: not a sweep
    with pytest.raises(UnknownSweep) as raised:
        sweeps.load(root, "lr")
    assert str(raised.value) == f"unknown sweep 'lr' under {root}; sweeps there: heads, wd"


def test_credentials_never_land_in_sweep_json(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-0123456789")
    root = str(tmp_path)
    record = a_sweep(root, command="kiln sweep tracker.api_key=wandb-secret-0123456789 optim.lr=0.1,0.2")
    record.fixed = ["data.source=s3://alice:hunter22@bucket/data"]
    sweeps.create(root, record)
    record.error = "could not read s3://alice:hunter22@bucket/data with wandb-secret-0123456789"
    sweeps.save(root, record)
    text = (tmp_path / "sweeps" / "lr" / "sweep.json").read_text()
    assert "wandb-secret-0123456789" not in text and "hunter22" not in text
    assert "***REDACTED***" in text


def test_the_stop_marker_is_left_seen_and_cleared(tmp_path):
    root = str(tmp_path)
    sweeps.create(root, a_sweep(root))
    assert not sweeps.sweep_stop_requested(root, "lr")
    sweeps.request_sweep_stop(root, "lr", "stop requested by `kiln sweep stop lr`")
    assert sweeps.sweep_stop_requested(root, "lr")
    assert (tmp_path / "sweeps" / "lr" / "STOP").read_text() == "stop requested by `kiln sweep stop lr`"
    assert not sweeps.sweep_stop_requested(root, "other")  # one sweep's stop is not another's
    sweeps.clear_sweep_stop(root, "lr")
    assert not sweeps.sweep_stop_requested(root, "lr")
    sweeps.clear_sweep_stop(root, "lr")  # a resume with nothing to clear
    assert not (tmp_path / "sweeps" / "lr" / "STOP").exists()


# ---- was a stopped trial pruned? --------------------------------------------------------------------------------


def event(kind: str, time: float) -> dict:
    return {"kind": kind, "time": time}


def test_a_trial_stopped_by_asha_since_it_started_was_pruned():
    assert was_pruned([event("attempt_started", 99.0), event(PRUNED_EVENT, 100.0)], since=100.0)
    # a user's stop before the prune is overtaken by it
    assert was_pruned([event("stop_requested", 100.5), event(PRUNED_EVENT, 101.0)], since=100.0)


def test_a_stop_asked_after_the_prune_is_the_users_not_asha():
    assert not was_pruned([event(PRUNED_EVENT, 101.0), event("stop_requested", 102.0)], since=100.0)


def test_a_prune_from_an_earlier_driver_does_not_count():
    assert not was_pruned([event(PRUNED_EVENT, 50.0)], since=100.0)
    assert not was_pruned([event(PRUNED_EVENT, 50.0), event("stop_requested", 150.0)], since=100.0)
    assert not was_pruned([{"kind": PRUNED_EVENT}], since=100.0)  # no time: not since anything
    assert not was_pruned([], since=0.0)
    assert not was_pruned([event("finished", 150.0)], since=100.0)


# ---- how many trials the cluster holds at once ----------------------------------------------------------------


def test_cpu_trials_fit_by_the_cpus_of_their_worker_groups():
    cfg = compose_config(["cluster.num_workers=2", "cluster.cpus_per_worker=2"])
    assert fitting_trials([{"CPU": 8.0}, {"CPU": 8.0, "GPU": 4.0}], cfg) == 4  # 16 CPUs / (2 x 2); GPUs unused
    assert fitting_trials([{"CPU": 7.0}], cfg) == 1


def test_gpu_trials_fit_by_their_gpus():
    cfg = compose_config(["cluster.use_gpu=true", "cluster.num_workers=2"])
    assert fitting_trials([{"CPU": 32.0, "GPU": 4.0}, {"CPU": 32.0, "GPU": 2.0}], cfg) == 3
    assert fitting_trials([{"CPU": 32.0}], cfg) == 1  # no GPU at all: still one, which waits


def test_custom_resources_count_too():
    cfg = compose_config(["+cluster.resources_per_worker.tpu_slice=1", "cluster.num_workers=2"])
    assert fitting_trials([{"CPU": 64.0, "tpu_slice": 3.0}, {"CPU": 64.0, "tpu_slice": 2.0}], cfg) == 2


def test_an_elastic_trial_counts_its_fewest_workers():
    cfg = compose_config(["cluster.num_workers=[2,4]", "train.micro_batch=1", "train.global_batch=12"])
    assert fitting_trials([{"CPU": 8.0}], cfg) == 4


def test_at_least_one_trial_runs():
    cfg = compose_config(["cluster.num_workers=4", "train.micro_batch=4"])
    assert fitting_trials([{"CPU": 2.0}], cfg) == 1
    assert fitting_trials([], cfg) == 1


def test_a_gpu_count_per_worker_replaces_the_one_gpu_of_use_gpu():
    cfg = compose_config(["cluster.use_gpu=true", "cluster.resources_per_worker={GPU:2}", "cluster.num_workers=2"])
    assert fitting_trials([{"CPU": 64.0, "GPU": 8.0}], cfg) == 2  # 8 GPUs / (2 workers x 2 GPUs)


def test_fractional_resources_are_counted_as_ray_counts_them():
    cfg = compose_config(["cluster.resources_per_worker={tpu_share:0.1}", "cluster.num_workers=1"])
    assert fitting_trials([{"CPU": 64.0, "tpu_share": 1.0}], cfg) == 10


# ---- `kiln sweep status X` and `kiln train -m` reach the sweep commands -----------------------------------------


@pytest.mark.parametrize(
    "argv, routed",
    [
        (["sweep", "status", "lr"], ["sweep-status", "lr"]),
        (["sweep", "status", "lr", "--json"], ["sweep-status", "lr", "--json"]),
        (["sweep", "resume", "lr", "--retry-failed"], ["sweep-resume", "lr", "--retry-failed"]),
        (["sweep", "stop", "lr", "--wait", "30"], ["sweep-stop", "lr", "--wait", "30"]),
        (["sweep", "start", "lr"], ["sweep-start", "lr"]),
        (["train", "-m", "optim.lr=1e-4,3e-4"], ["sweep", "optim.lr=1e-4,3e-4"]),
        (["train", "optim.lr=1e-4,3e-4", "--multirun", "sweep.id=x"], ["sweep", "optim.lr=1e-4,3e-4", "sweep.id=x"]),
    ],
)
def test_sweep_actions_and_multirun_are_routed_to_the_sweep_commands(argv, routed):
    assert sweep_argv(argv) == routed


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "optim.lr=1e-4,3e-4"],
        ["sweep"],
        ["train", "optim.lr=1e-4"],
        ["status", "lr"],
        ["resume", "lr-1"],
        [],
    ],
)
def test_every_other_command_line_is_left_alone(argv):
    assert sweep_argv(list(argv)) == argv


def test_the_routed_command_lines_parse_as_the_sweep_commands():
    status = parser().parse_args(sweep_argv(["sweep", "status", "lr", "--json", "--storage-root", "/tmp/x"]))
    assert (status.command, status.sweep, status.json, status.storage_root) == ("sweep-status", "lr", True, "/tmp/x")
    assert status.func is cmd_sweep_status
    multirun = parser().parse_args(sweep_argv(["train", "-m", "optim.lr=1e-4,3e-4"]))
    assert (multirun.command, multirun.overrides) == ("sweep", ["optim.lr=1e-4,3e-4"])


# ---- `kiln sweep status`: the trials as their runs say now, the best marked --------------------------------------


def write_sweep_json(root, sweep_id: str = "lr", **changes) -> None:
    """sweep.json as a driver left it: every trial still as it was when the sweep began."""
    data = {
        "sweep_id": sweep_id,
        "command": "kiln sweep train.max_steps=4 optim.lr=0.1,0.2,0.3,0.4",
        "overrides": ["train.max_steps=4", "optim.lr=0.1,0.2,0.3,0.4"],
        "storage_root": str(root),
        "search": "grid",
        "settings": {"id": sweep_id, "search": "grid", "metric": "val/loss", "mode": "min"},
        "fixed": ["train.max_steps=4"],
        "swept": ["optim.lr=0.1,0.2,0.3,0.4"],
        "points": POINTS,
        "trials": [
            {"n": n, "run_id": f"{sweep_id}-{n}", "overrides": point, "state": NOT_STARTED, "step": 0}
            for n, point in enumerate(POINTS, 1)
        ],
        "state": SweepState.FINISHED,
        "created": "2024-05-01T10:00:00Z",
        "updated": "2024-05-01T10:05:00Z",
    } | changes
    folder = root / "sweeps" / sweep_id
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps(data))


def write_run(root, run_id: str, state: str, step: int, val_losses: list[float]) -> None:
    """A trial's run folder: run.json, and one evaluation row (and a training row) per val/loss."""
    RunRegistry(str(root)).create(RunRecord(run_id=run_id, state=state, step=step, max_steps=4), "x: 1\n")
    rows = []
    for i, loss in enumerate(val_losses, 1):
        rows.append({"step": 2 * i, "loss": loss + 0.5, "time": 1000.0 + i})
        rows.append({"step": 2 * i, "val/loss": loss, "val/ppl": 2.718**loss, "time": 1000.0 + i})
    (root / run_id / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def three_trials_ran(root) -> None:
    """Trial 1 was best once but ended worst; trial 3, still running, is best at its last evaluation."""
    write_run(root, "lr-1", RunState.SUCCEEDED, 4, [1.0, 3.0])
    write_run(root, "lr-2", RunState.PRUNED, 2, [2.5])
    write_run(root, "lr-3", RunState.RUNNING, 3, [2.2, 2.0])


def rendered(view: dict) -> list[str]:
    console = Console(record=True, width=240, force_terminal=False)
    print_status(view, console)
    return console.export_text().splitlines()


def test_status_shows_each_trial_as_its_run_says_and_the_best_at_its_last_evaluation(tmp_path):
    write_sweep_json(tmp_path)
    three_trials_ran(tmp_path)
    view = status_json(str(tmp_path), "lr")
    assert (view["sweep_id"], view["state"], view["search"], view["metric"]) == ("lr", "FINISHED", "grid", "val/loss")
    trials = {t["run_id"]: t for t in view["trials"]}
    assert list(trials) == ["lr-1", "lr-2", "lr-3", "lr-4"]
    for run_id, state, step, best_val_loss, last in (
        ("lr-1", "SUCCEEDED", 4, 1.0, 3.0),
        ("lr-2", "PRUNED", 2, 2.5, 2.5),
        ("lr-3", "RUNNING", 3, 2.0, 2.0),
        ("lr-4", NOT_STARTED, 0, None, None),
    ):
        shown = trials[run_id]
        assert (shown["state"], shown["step"], shown["best_val_loss"], shown["last_metric"]) == (
            state,
            step,
            best_val_loss,
            last,
        ), run_id
    assert trials["lr-2"]["overrides"] == ["optim.lr=0.2"] and trials["lr-2"]["trial"] == 2
    assert view["best"] == "lr-3"  # not lr-1, whose best val/loss (1.0) is lowest but its last (3.0) is not
    assert view["resume_command"] is None
    json.dumps(view)  # `--json` prints it whole

    lines = rendered(view)
    assert "sweep lr: FINISHED (grid)" in lines[0]
    best_rows = [line for line in lines if line.strip().startswith("*")]
    assert len(best_rows) == 1 and "lr-3" in best_rows[0] and "optim.lr=0.3" in best_rows[0]
    assert "2.0000" in best_rows[0]
    assert any("lr-4" in line and NOT_STARTED in line for line in lines)
    assert "best: lr-3 (* lowest val/loss at its last evaluation)" in lines
    assert not any(line.startswith("resume:") for line in lines)


def test_status_with_mode_max_marks_the_highest(tmp_path):
    write_sweep_json(tmp_path, settings={"id": "lr", "metric": "val/ppl", "mode": "max"})
    three_trials_ran(tmp_path)
    view = status_json(str(tmp_path), "lr")
    assert view["best"] == "lr-1"  # highest val/ppl at its last evaluation (e^3)
    assert "best: lr-1 (* highest val/ppl at its last evaluation)" in rendered(view)


def test_a_sweep_nothing_has_run_of_yet_has_no_best(tmp_path):
    write_sweep_json(tmp_path, state=SweepState.STOPPED, error="the sweep's driver received SIGTERM")
    view = status_json(str(tmp_path), "lr")
    assert view["best"] is None and {t["state"] for t in view["trials"]} == {NOT_STARTED}
    lines = rendered(view)
    assert not any(line.startswith("best:") for line in lines)
    assert "error: the sweep's driver received SIGTERM" in lines
    assert f"resume:  kiln sweep resume lr --storage-root {tmp_path}" in lines


def test_a_running_sweep_whose_driver_is_gone_shows_driver_lost(tmp_path):
    gone = {**this_host(), "pid": GONE_PID, "started": 1.0e9, "command": "kiln sweep lr"}
    write_sweep_json(tmp_path, state=SweepState.RUNNING, driver=gone)
    three_trials_ran(tmp_path)
    view = status_json(str(tmp_path), "lr")
    assert (view["state"], view["recorded_state"]) == ("DRIVER_LOST", SweepState.RUNNING)
    assert view["resume_command"] == f"kiln sweep resume lr --storage-root {tmp_path}"
    lines = rendered(view)
    assert "sweep lr: DRIVER_LOST (grid)" in lines[0]
    assert f"resume:  kiln sweep resume lr --storage-root {tmp_path}" in lines


def test_a_running_sweep_whose_driver_lives_shows_running(tmp_path):
    write_sweep_json(tmp_path, state=SweepState.RUNNING, driver=DriverIdentity.here("kiln sweep lr").liveness_json())
    view = status_json(str(tmp_path), "lr")
    assert view["state"] == SweepState.RUNNING
    assert not any(line.startswith("resume:") for line in rendered(view))  # it is running: nothing to resume


def test_a_driver_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    elsewhere = {"host": "some-other-host", "pid_ns": None, "pid": 1, "started": 1.0e9, "command": "kiln sweep lr"}
    write_sweep_json(tmp_path, state=SweepState.RUNNING, driver=elsewhere, updated="2020-01-01T00:00:00Z")
    assert status_json(str(tmp_path), "lr")["state"] == "DRIVER_LOST"
    root = tmp_path / "fresh"
    write_sweep_json(root, state=SweepState.RUNNING, driver=elsewhere, updated=now())
    assert status_json(str(root), "lr")["state"] == SweepState.RUNNING


def test_status_of_an_unknown_sweep_names_the_sweeps_there(tmp_path):
    write_sweep_json(tmp_path, "wd")
    with pytest.raises(UnknownSweep, match=r"unknown sweep 'lr' under .*; sweeps there: wd$"):
        status_json(str(tmp_path), "lr")


def test_a_new_sweep_never_adopts_an_existing_run_named_like_one_of_its_trials(tmp_path):
    from orchestrator.cli.sweep import check_trial_ids_free

    registry = RunRegistry(str(tmp_path))
    registry.create(RunRecord(run_id="lr-3", experiment="x", max_steps=4, strategy="ddp", num_workers=1), "x: 1")
    check_trial_ids_free(registry, "lr", 2)  # trials lr-1, lr-2: free
    with pytest.raises(UsageError, match="run lr-3 already exists .* choose another sweep.id"):
        check_trial_ids_free(registry, "lr", 4)


def test_kiln_sweep_start_runs_only_a_submitted_sweep_that_has_not_started(tmp_path):
    import argparse

    from orchestrator.cli.sweep import cmd_sweep_start

    sweeps.create(str(tmp_path), a_sweep(str(tmp_path), state=SweepState.FINISHED))
    args = argparse.Namespace(sweep="lr", storage_root=str(tmp_path), retry_failed=False)
    with pytest.raises(UsageError, match="sweep lr is FINISHED: .* `kiln sweep resume lr`"):
        cmd_sweep_start(args, Console())
