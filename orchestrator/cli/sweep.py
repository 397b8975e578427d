"""`kiln sweep` (and `kiln train -m`), `kiln sweep status|resume|stop`, and `kiln sweep start` (a Ray job's)."""

from __future__ import annotations

import argparse
import shlex
import time

from rich import box
from rich.console import Console
from rich.table import Table

from data_pipeline.redaction import redact_text
from orchestrator.cli.options import add_address, add_json, add_storage_root
from orchestrator.config import UsageError, absolute_url, compose_config, finalize, new_run_id
from orchestrator.run.liveness import DriverIdentity, driver_alive, pid_start_time, this_host
from orchestrator.run.registry import RunRegistry
from orchestrator.sweep import record as sweeps
from orchestrator.sweep.record import (
    FINISHED_TRIAL_STATES,
    DriverWork,
    SweepRecord,
    SweepState,
    TrialEntry,
    aborted_state,
    best_trial,
    driver_work,
    plan_resume,
    refresh_entry,
)
from orchestrator.sweep.space import SweepPlan, plan_sweep

EXIT_FAILED, EXIT_STOPPED = 1, 3
SWEEP_ACTIONS = ("status", "resume", "stop", "start")


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    """`kiln sweep OVERRIDES...`: validate every point, record the sweep, run it here or as a Ray job."""
    plan = plan_sweep(args.overrides)  # a bad point exits 2 here, before anything is written or started
    base = finalize(plan.base)
    root = base.storage.root
    RunRegistry(root).check_root()
    settings = plan.settings
    sweep_id = settings.id or new_run_id(f"{base.run.name[:24]}-sweep")
    settings.id = sweep_id
    record = SweepRecord(
        sweep_id=sweep_id,
        command=redact_text(shlex.join(["kiln", "sweep", *args.overrides])),
        overrides=list(args.overrides),
        storage_root=root,
        search=settings.search,
        settings=settings.as_dict(),
        fixed=plan.space.fixed,
        swept=[d.typed for d in plan.space.dimensions],
        points=plan.points,
        trials=[TrialEntry(n, sweeps.trial_run_id(sweep_id, n), point) for n, point in enumerate(plan.points, 1)],
    )
    check_trial_ids_free(RunRegistry(root), sweep_id, len(plan.points) or settings.num_trials or 0)
    if getattr(args, "address", None):
        from orchestrator.sweep.jobs import submit_sweep

        return submit_sweep(record, args, console)
    prepare_data(plan, console)  # a missing dataset fails here, before the sweep is recorded
    record.driver = DriverIdentity.here(f"kiln sweep {sweep_id}").liveness_json()
    sweeps.create(root, record)
    return run_here(record, plan, console, prepared=True)


def check_trial_ids_free(registry: RunRegistry, sweep_id: str, trials: int) -> None:
    """UsageError if a run already has a trial's id: the sweep would take it for its own trial."""
    taken = sorted(set(registry.run_ids()) & {sweeps.trial_run_id(sweep_id, n) for n in range(1, trials + 1)})
    if taken:
        raise UsageError(
            f"run {taken[0]} already exists under {registry.root}, and sweep {sweep_id} would name a trial so; "
            "choose another sweep.id"
        )


def prepare_data(plan: SweepPlan, console: Console) -> None:
    """Prepare (or find) each distinct dataset the points train on, once, before trials run at once."""
    from orchestrator.run.planning import resolve_data

    seen: set[str] = set()
    for point in plan.points or [[]]:
        cfg = finalize(compose_config(plan.space.fixed + point)) if point else finalize(plan.base)
        key = repr((cfg.data, cfg.task.name))
        if key not in seen:
            seen.add(key)
            resolve_data(cfg, log=lambda m: console.print(f"[dim]{m}[/dim]"))


def run_here(
    record: SweepRecord, plan: SweepPlan, console: Console, retry_failed: bool = False, prepared: bool = False
) -> int:
    """Run the sweep's unfinished trials with this process as its driver; returns the exit code."""
    root = record.storage_root
    registry = RunRegistry(root)
    if not prepared:
        prepare_data(plan, console)  # here: where the trials run (a submitted sweep's job prepares on the cluster)
    run_states = {t.n: run_state(registry, t.run_id) for t in record.trials}
    steps = plan_resume(run_states, retry_failed)
    work = driver_work(record, run_states, steps, plan.settings.num_trials)
    if steps.resume or steps.done:
        console.print(
            f"sweep {record.sweep_id}: {len(steps.done)} trial(s) ended (left as they are), {len(steps.resume)} to "
            f"continue from their last committed checkpoint, {len(steps.start) + work.new_trials} to start"
        )
    state = drive_sweep(record, plan, work, console)
    console.print()
    print_status(status_json(root, record.sweep_id), console)
    if state == SweepState.STOPPED:
        return EXIT_STOPPED  # the status above says how to resume it
    ended = [t.state for t in sweeps.load(root, record.sweep_id).trials]
    return 0 if any(s in FINISHED_TRIAL_STATES for s in ended) else EXIT_FAILED


def drive_sweep(record: SweepRecord, plan: SweepPlan, work: DriverWork, console: Console) -> str:
    """Start Ray (or join the cluster), check the trials' placement and run the driver; the sweep's end state.

    A driver that raises leaves the sweep FAILED (STOPPED after a second Ctrl-C) in sweep.json.
    """
    from orchestrator.cluster.ray_handle import check_placement, ray_processes_in_their_own_session, start_ray
    from orchestrator.run.plan import placement_of
    from orchestrator.sweep.driver import SweepDriver

    we_started = False
    try:
        with ray_processes_in_their_own_session(embedded=plan.base.cluster.address is None):
            we_started = start_ray(plan.base)
        check_placement(placement_of(plan.base.cluster), console)
        driver = SweepDriver(record, plan.space, plan.base, console)
        return driver.run(work)
    except BaseException as exc:
        record.state, record.error = aborted_state(exc)
        sweeps.save(record.storage_root, record)
        raise
    finally:
        if we_started:
            import ray

            ray.shutdown()


def run_state(registry: RunRegistry, run_id: str) -> str | None:
    """A trial run's state, None if it does not exist."""
    from orchestrator.run.registry import UnknownRun

    try:
        return registry.load(run_id).state
    except UnknownRun:
        return None


def root_flag(root: str) -> str:
    from data_pipeline.config import default_storage_root

    return "" if root == absolute_url(default_storage_root()) else f" --storage-root {root}"


def replan(record: SweepRecord, on_cluster: bool = False) -> SweepPlan:
    """The sweep's plan again from its recorded command line (its points as recorded)."""
    plan = plan_sweep(record.overrides)
    plan.points = record.points
    plan.settings.id = record.sweep_id
    base = finalize(plan.base)
    base.storage.root = record.storage_root
    if on_cluster:
        base.cluster.address = "auto"
    return plan


def check_not_running(record: SweepRecord, force: bool = False) -> None:
    """UsageError if the sweep's driver still runs (its trials would be driven twice)."""
    if force or record.state not in (SweepState.RUNNING, SweepState.PENDING) or record.driver is None:
        return
    verdict = driver_alive(record.driver, record.updated, time.time(), this_host(), pid_start_time)
    if verdict.alive:
        raise UsageError(
            f"sweep {record.sweep_id} is running: {verdict.reason}; stop it with `kiln sweep stop "
            f"{record.sweep_id}` first, or pass --force if you know its driver is gone"
        )


def cmd_sweep_resume(args: argparse.Namespace, console: Console) -> int:
    """`kiln sweep resume SWEEP`: finish unfinished trials from their checkpoints, start the rest."""
    root = absolute_url(args.storage_root)
    record = sweeps.load(root, args.sweep)
    check_not_running(record, args.force)
    if not args.force and record.job_id and record.cluster_address:
        from orchestrator.sweep.jobs import check_job_ended

        check_job_ended(record)
    if getattr(args, "address", None):
        from orchestrator.sweep.jobs import resubmit_sweep

        return resubmit_sweep(record, args, console)
    plan = replan(record)
    sweeps.clear_sweep_stop(root, record.sweep_id)
    record.driver = DriverIdentity.here(f"kiln sweep resume {record.sweep_id}").liveness_json()
    return run_here(record, plan, console, retry_failed=args.retry_failed)


def cmd_sweep_start(args: argparse.Namespace, console: Console) -> int:
    """`kiln sweep start SWEEP`: what a submitted sweep's Ray job runs: the sweep's driver, on the cluster."""
    root = absolute_url(args.storage_root)
    record = sweeps.load(root, args.sweep)
    if record.state != SweepState.PENDING:
        raise UsageError(
            f"sweep {args.sweep} is {record.state}: `kiln sweep start` runs a submitted (PENDING) sweep's driver "
            f"once; continue it with `kiln sweep resume {args.sweep}`"
        )
    plan = replan(record, on_cluster=True)  # a stop asked while the job was PENDING holds: no clear_sweep_stop
    record.driver = DriverIdentity.here(f"kiln sweep start {record.sweep_id}").liveness_json()
    return run_here(record, plan, console, retry_failed=args.retry_failed)


def cmd_sweep_stop(args: argparse.Namespace, console: Console) -> int:
    """`kiln sweep stop SWEEP`: every running trial commits a checkpoint and stops; no new trial starts."""
    from orchestrator.sweep.driver import stop_sweep

    root = absolute_url(args.storage_root)
    record = sweeps.load(root, args.sweep)
    if record.state not in (SweepState.RUNNING, SweepState.PENDING):
        raise UsageError(f"sweep {args.sweep} is {record.state}, not running; nothing to stop")
    asked = stop_sweep(root, record, f"stop requested by `kiln sweep stop {args.sweep}`")
    console.print(
        f"asked sweep {args.sweep} to start no more trials"
        + (f" and {len(asked)} running trial(s) to commit a checkpoint and stop: {', '.join(asked)}" if asked else "")
    )
    console.print(f"continue it with: kiln sweep resume {args.sweep}{root_flag(root)}")
    deadline = time.monotonic() + args.wait
    while args.wait and time.monotonic() < deadline:
        if sweeps.load(root, args.sweep).state not in (SweepState.RUNNING, SweepState.PENDING):
            break
        time.sleep(1)
    return 0


def status_json(root: str, sweep_id: str) -> dict:
    """What `kiln sweep status SWEEP --json` prints: the sweep, each trial as its run says now, the best."""
    record = sweeps.load(root, sweep_id)
    registry = RunRegistry(root)
    metric, mode = record.settings.get("metric", "val/loss"), record.settings.get("mode", "min")
    for entry in record.trials:
        refresh_entry(registry, entry, metric)
    best = best_trial(record.trials, mode)
    state = record.state
    if state == SweepState.RUNNING and record.driver:
        verdict = driver_alive(record.driver, record.updated, time.time(), this_host(), pid_start_time)
        state = state if verdict.alive else "DRIVER_LOST"
    return {
        "sweep_id": record.sweep_id,
        "state": state,
        "recorded_state": record.state,
        "search": record.search,
        "metric": metric,
        "mode": mode,
        "command": record.command,
        "storage_root": root,
        "trials": [
            {
                "run_id": t.run_id,
                "trial": t.n,
                "overrides": t.overrides,
                "state": t.state,
                "step": t.step,
                "best_val_loss": t.best_val_loss,
                "last_metric": t.last_metric,
            }
            for t in record.trials
        ],
        "best": best.run_id if best else None,
        "max_concurrent": record.max_concurrent,
        "job_id": record.job_id,
        "cluster_address": record.cluster_address,
        "created": record.created,
        "updated": record.updated,
        "error": record.error,
        "resume_command": None
        if state == SweepState.FINISHED
        else f"kiln sweep resume {record.sweep_id}{root_flag(root)}",
    }


def print_status(view: dict, console: Console) -> None:
    """The trials table, the best one marked."""
    metric = view["metric"]
    table = Table(box=box.SIMPLE_HEAD, title=f"sweep {view['sweep_id']}: {view['state']} ({view['search']})")
    for column in ("", "trial", "overrides", "state", "step", "best val/loss", f"last {metric}"):
        table.add_column(column, justify="right" if column in ("step", "best val/loss", f"last {metric}") else "left")
    for trial in view["trials"]:
        best = trial["run_id"] == view["best"]
        table.add_row(
            "*" if best else "",
            trial["run_id"],
            " ".join(trial["overrides"]),
            trial["state"],
            str(trial["step"]),
            fmt(trial["best_val_loss"]),
            fmt(trial["last_metric"]),
            style="bold green" if best else None,
        )
    console.print(table)
    if view["best"]:
        console.print(
            f"best: {view['best']} (* lowest {metric} at its last evaluation)"
            if view["mode"] == "min"
            else f"best: {view['best']} (* highest {metric} at its last evaluation)"
        )
    if view["error"]:
        console.print(f"[red]error: {view['error']}[/red]")
    if view["state"] not in (SweepState.FINISHED, SweepState.RUNNING, SweepState.PENDING) and view["resume_command"]:
        console.print(f"resume:  {view['resume_command']}")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_sweep_status(args: argparse.Namespace, console: Console) -> int:
    """`kiln sweep status SWEEP [--json]`."""
    from orchestrator.run.lifecycle import dumps

    view = status_json(absolute_url(args.storage_root), args.sweep)
    if args.json:
        print(redact_text(dumps(view)))
    else:
        print_status(view, console)
    return 0


def add_sweep_commands(sub, default_root: str) -> None:
    """The `kiln sweep` parsers: `kiln sweep OVERRIDES` and its actions (routed by `sweep_argv`)."""
    sweep = sub.add_parser(
        "sweep",
        help="a hyperparameter sweep on Ray Tune: kiln sweep optim.lr=1e-4,3e-4 model.n_layer=2,4 ...; "
        "kiln sweep status|resume|stop SWEEP",
    )
    sweep.add_argument(
        "overrides", nargs="*", help="Hydra overrides with sweeps (a,b range() choice() interval() glob())"
    )
    add_address(sweep, "run the sweep's driver as a Ray job on this cluster (Jobs API)")
    sweep.add_argument("--follow", action="store_true", help="with --address: stream the driver's log to the end")
    sweep.add_argument("--working-dir", default=None, help="with --address: ship this Kiln checkout with the job")
    sweep.set_defaults(func=cmd_sweep)
    for action, func, help_text in (
        ("status", cmd_sweep_status, "a sweep's trials, the best one marked"),
        ("resume", cmd_sweep_resume, "finish a sweep's unfinished trials and start the rest"),
        ("stop", cmd_sweep_stop, "stop every running trial with a committed checkpoint"),
        ("start", cmd_sweep_start, "run a recorded sweep's driver here (what a submitted sweep's Ray job runs)"),
    ):
        # No help=: `kiln --help` lists `sweep` only (these are reached as `kiln sweep ACTION`, see sweep_argv).
        parser = sub.add_parser(f"sweep-{action}", prog=f"kiln sweep {action}", description=help_text)
        parser.add_argument("sweep")
        add_storage_root(parser, default_root)
        if action == "status":
            add_json(parser)
        if action in ("resume", "start"):
            parser.add_argument("--retry-failed", action="store_true", help="run FAILED trials again too")
        if action == "resume":
            parser.add_argument("--force", action="store_true", help="resume even if the sweep's driver looks alive")
            add_address(parser, "resubmit the sweep's driver as a Ray job to this cluster")
            parser.add_argument("--follow", action="store_true", help="with --address: stream the driver's log")
            parser.add_argument("--working-dir", default=None, help="with --address: ship this Kiln checkout")
        if action == "stop":
            parser.add_argument("--wait", type=float, default=0, help="seconds to wait for the sweep to stop")
        parser.set_defaults(func=func)


def sweep_argv(argv: list[str]) -> list[str]:
    """`kiln sweep status X` -> the parser's `sweep-status X`; `kiln train -m ...` -> `kiln sweep ...`."""
    if len(argv) >= 2 and argv[0] == "sweep" and argv[1] in SWEEP_ACTIONS:
        return [f"sweep-{argv[1]}", *argv[2:]]
    if argv and argv[0] == "train" and any(a in ("-m", "--multirun") for a in argv[1:]):
        return ["sweep", *[a for a in argv[1:] if a not in ("-m", "--multirun")]]
    return argv
