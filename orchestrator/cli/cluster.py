"""The `kiln` commands for runs on a Ray cluster: submit and logs, and the cluster side of start, stop and
resume. Thin wrappers over orchestrator/cluster/jobs.py."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import replace

from rich.console import Console

from data_pipeline import storage
from data_pipeline.redaction import redact_text
from orchestrator.cli.options import STORAGE_ROOT
from orchestrator.cluster.jobs import (
    ADDRESS_ENV,
    client,
    entrypoint,
    exit_code_of,
    follow_job_logs,
    job_logs,
    job_view,
    jobs_address,
    next_job_id,
    shared_root_warning,
    shipped_code,
    stop_job,
    submit_job,
    write_out,
)
from orchestrator.config import UsageError, absolute_url
from orchestrator.run.registry import RunRecord, RunRegistry, now
from orchestrator.run.submitted import (
    AGENT_WAIT_S,
    NO_AGENT,
    STOP_NOW_WAIT_S,
    DriverJobCheck,
    JobVerdict,
    StopWait,
    SubmitAction,
    SubmitTry,
    decide_driver_job,
    decide_stop_wait,
    decide_submission,
    judge_submitted_run,
    log_tail,
)
from trainers.run.folder import LOGS_DIR, worker_log_name
from trainers.run.state import RunState, is_terminal

# The job's driver connects to the cluster it runs on (Ray sets RAY_ADDRESS for a job's entrypoint).
ON_THE_CLUSTER = "cluster.address=auto"
FOLLOW_POLL_S = 1.0


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.config import compose_config, new_run_id
    from orchestrator.run.lifecycle import register_submission
    from orchestrator.run.planning import plan_submission

    cfg = compose_config(args.overrides)  # bad input fails here: nothing is registered or submitted
    address = jobs_address(args.address, os.environ.get(ADDRESS_ENV), cfg.cluster.address)
    warning = shared_root_warning(cfg.storage.root)
    working_dir = shipped_code(args.working_dir)
    client(address)  # reachable and authorised, before a run exists that no job would ever start
    cfg.run.id = cfg.run.id or new_run_id(cfg.run.name)
    job_id = next_job_id(cfg.run.id, None)
    plan = plan_submission(cfg, log=lambda m: console.print(f"[dim]{m}[/dim]"))  # bad input fails before a run exists
    registry, record = register_submission(plan, job_id, address)
    if warning:
        console.print(f"[yellow]warning: {warning}[/yellow]")
    command = entrypoint(["start", record.run_id, ON_THE_CLUSTER, STORAGE_ROOT, registry.root], bool(working_dir))
    submit(
        registry, record, address, command, working_dir, new_run=True, log=lambda m: console.print(f"[dim]{m}[/dim]")
    )
    return announce(registry, record, address, args.follow, console)


def submit(
    registry: RunRegistry,
    record: RunRecord,
    address: str,
    command: str,
    working_dir: str | None,
    new_run: bool = False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = lambda message: None,
) -> None:
    """Submit the run's job, waiting (up to AGENT_WAIT_S) for a head's job agent; a refusal is settled."""
    metadata = {"kiln_run_id": record.run_id, "kiln_storage_root": registry.root}
    started, wait_s = clock(), 0.0
    while True:
        try:
            if wait_s:
                sleep(wait_s)
            submit_job(address, str(record.job_id), command, metadata, working_dir)
            return
        except BaseException as exc:  # Ctrl-C too: the record must still say what happened
            tried = SubmitTry(str(exc), clock() - started, new_run)
            decision = decide_submission(tried)
            if decision.action != SubmitAction.RETRY:
                settle_refusal(registry, record, address, tried, exc)
                return
            if not wait_s:
                log(f"the Ray head at {address} has no job agent up yet; waiting up to {AGENT_WAIT_S:.0f}s for it")
            wait_s = decision.wait_s


def settle_refusal(
    registry: RunRegistry, record: RunRecord, address: str, tried: SubmitTry, exc: BaseException
) -> None:
    """After the last refused try: go on if Ray holds the job anyway, else forget the new run or record why."""
    status = job_view(address, str(record.job_id)).status
    action = decide_submission(replace(tried, job_status=status)).action
    if action == SubmitAction.ACCEPTED:
        return
    if action == SubmitAction.FORGET_RUN:
        # Nothing reached the cluster: the run's folder holds only what `kiln submit` wrote a moment ago.
        storage.remove(registry.run_url(record.run_id), recursive=True)
        if NO_AGENT in (tried.error or ""):
            raise UsageError(
                f"the Ray Jobs API at {address} had no job agent to take the job for {AGENT_WAIT_S:.0f}s (the "
                "head registers it seconds after it starts; `ray status` on the head shows whether it is up): "
                f"nothing was submitted and run {record.run_id} was not kept; submit again once the head is ready"
            ) from None
        raise exc
    if record.state == RunState.PENDING:
        record.state = RunState.FAILED
    record.error = f"the Ray job could not be submitted to {address}: {exc}"
    registry.save(record)
    raise exc


def announce(registry: RunRegistry, record: RunRecord, address: str, follow: bool, console: Console) -> int:
    """Say what was submitted and how to watch it; with follow, stream its log and return the run's exit code."""
    root = registry.root
    console.print(f"run [bold]{record.run_id}[/bold] submitted to {address} as Ray job [bold]{record.job_id}[/bold]")
    console.print(f"follow:  kiln logs {record.run_id} --follow --storage-root {root}")
    console.print(f"status:  kiln status {record.run_id} --storage-root {root}")
    console.print(f"stop:    kiln stop {record.run_id} --storage-root {root}")
    if not follow:
        return 0
    submitted = (record.state, len(record.attempts))  # what the job's driver changes once it runs
    follow_job_logs(address, str(record.job_id), write_out)
    return finished(registry, record.run_id, address, str(record.job_id), console, submitted)


def finished(
    registry: RunRegistry, run_id: str, address: str, job_id: str, console: Console, submitted: tuple[str, int]
) -> int:
    """After the job ended: the run's exit code, as `kiln train` would have returned it.

    submitted: the run's state and number of attempts when the job was submitted; unchanged, the job's
    driver never wrote to the run (its entrypoint never ran Kiln).
    """
    from orchestrator.run.lifecycle import resume_command

    view = job_view(address, job_id)
    record = registry.load(run_id)
    heard = (record.state, len(record.attempts)) != submitted
    verdict = judge_submitted_run(record.state, job_ended=True, heard_from_driver=heard)  # its log has ended
    if verdict == JobVerdict.NEVER_STARTED:
        never_ran(address, job_id, view.status, run_id, console)
        return 1
    if verdict == JobVerdict.DRIVER_LOST:
        console.print(
            f"[red]Ray job {job_id} ended {view.status} ({view.message or 'no message'}) but run {run_id} "
            f"is still {record.state}: its driver was lost; continue it with "
            f"{resume_command(run_id, registry.root, address)}[/red]"
        )
        return 1
    return exit_code_of(view.driver_exit_code, record.state)


def never_ran(address: str, job_id: str, status: str, run_id: str, console: Console) -> None:
    """Say that the job ended before it started the run, with the last lines of its log (which say why)."""
    try:
        tail = log_tail(job_logs(address, job_id))
    except UsageError as exc:
        tail = [f"(its log cannot be read: {exc})"]
    console.print(
        f"[red]Ray job {job_id} ended {status} before it started run {run_id}: the run never started on the "
        "cluster, and resuming it would fail the same way. The job's log ends with:[/red]"
    )
    for line in tail:
        console.print(f"  {redact_text(line)}", markup=False, highlight=False)
    console.print(
        "[red]fix what it says (Kiln must be installed on the cluster's nodes, or pass --working-dir to ship "
        "this checkout with the job) and submit again[/red]"
    )


def never_started(registry: RunRegistry, run_id: str, exc: BaseException) -> None:
    """A submitted run that could not start on the cluster ends FAILED with the reason (not PENDING forever)."""
    try:
        record = registry.load(run_id)
    except Exception:  # no record to mark: the error itself is what the job's log shows
        return
    if record.state == RunState.PENDING:
        record.state, record.error = RunState.FAILED, redact_text(f"could not start on the cluster: {exc}")
        registry.save(record)


def cmd_logs(args: argparse.Namespace, console: Console) -> int:
    registry = RunRegistry(absolute_url(args.storage_root))
    record = registry.load(args.run)
    if args.rank is not None:
        return worker_log(registry, record, args.rank, args.follow)
    if not record.job_id or not record.cluster_address:
        driver = record.driver or {}
        raise UsageError(
            f"run {args.run} was not submitted to a cluster: its driver's log is the output of "
            f"`{driver.get('command', 'kiln train')}` on {driver.get('host', 'its machine')}; its workers' "
            f"logs: kiln logs {args.run} --rank N (N from 0 to {max(record.num_workers - 1, 0)})"
        )
    if args.follow:
        follow_job_logs(record.cluster_address, record.job_id, write_out)
    else:
        write_out(job_logs(record.cluster_address, record.job_id))
    return 0


def worker_log(registry: RunRegistry, record: RunRecord, rank: int, follow: bool) -> int:
    """Print rank's log from the run folder; with follow, keep printing what is added until the run ends."""
    url = storage.join(registry.run_url(record.run_id), LOGS_DIR, worker_log_name(rank))
    shown = 0
    while True:
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            if not follow:
                logs = storage.list_names(storage.join(registry.run_url(record.run_id), LOGS_DIR))
                raise UsageError(
                    f"run {record.run_id} has no log for rank {rank} at {url}; it has: {', '.join(logs) or 'none'}"
                ) from None
            data = b""
        if len(data) > shown:
            write_out(data[shown:].decode("utf-8", errors="replace"))
            shown = len(data)
        elif not follow or is_terminal(registry.load(record.run_id).state):
            return 0
        time.sleep(FOLLOW_POLL_S)


def stop_now(registry: RunRegistry, record: RunRecord, console: Console) -> int:
    """`kiln stop RUN --now`: stop the run's Ray job at once and record the run STOPPED."""
    from orchestrator.run.attempts import current
    from orchestrator.run.lifecycle import resume_command
    from orchestrator.run.liveness import DriverIdentity
    from orchestrator.run.record import Cause, Outcome

    if not record.job_id or not record.cluster_address:
        raise UsageError(
            f"--now stops a submitted run's Ray job; run {record.run_id} was started by `kiln train`: "
            "`kiln stop` it gracefully, or press Ctrl-C twice in its terminal"
        )
    stop_job(record.cluster_address, record.job_id)
    asked = time.monotonic()
    while True:
        view = job_view(record.cluster_address, record.job_id)
        step = decide_stop_wait(view.status, time.monotonic() - asked)
        if step == StopWait.ENDED:
            break
        if step == StopWait.GIVE_UP:
            raise UsageError(f"Ray job {record.job_id} is still {view.status} {STOP_NOW_WAIT_S}s after the stop")
        time.sleep(1)
    record = registry.load(record.run_id)  # what the driver wrote last
    if not is_terminal(record.state):
        who = DriverIdentity.here("kiln stop --now")
        reason = (
            f"stopped at once by `kiln stop --now` ({who.who}): Ray job {record.job_id} "
            "ended without a final checkpoint"
        )
        record.state, record.error = RunState.STOPPED, reason
        attempt = current(record)
        if attempt is not None:
            attempt.close(Outcome.STOPPED, Cause(summary=reason), now())
        registry.save(record)
    console.print(
        f"Ray job {record.job_id} is {view.status}; run {record.run_id} is {record.state} at step {record.step} "
        f"(resume: {resume_command(record.run_id, registry.root, record.cluster_address)})"
    )
    return 0


def resubmit(args: argparse.Namespace, console: Console, root: str, overrides: list[str]) -> int:
    """`kiln resume RUN --address URL`: continue the run from its last committed checkpoint as a new Ray job."""
    from orchestrator.run.lifecycle import prepare_resume

    registry = RunRegistry(root)
    force = args.force or driver_job_ended(registry.load(args.run))
    registry, record, _cfg = prepare_resume(root, args.run, overrides, force)
    working_dir = shipped_code(args.working_dir)
    client(args.address)
    record.job_id, record.cluster_address = next_job_id(record.run_id, record.job_id), args.address
    registry.save(record)
    arguments = ["resume", record.run_id, *overrides, ON_THE_CLUSTER, STORAGE_ROOT, root, "--force"]
    command = entrypoint(arguments, bool(working_dir))
    console.print(f"resuming {record.run_id} ({record.state} at step {record.step}) on {args.address}")
    submit(registry, record, args.address, command, working_dir)
    return announce(registry, record, args.address, args.follow, console)


def driver_job_ended(record: RunRecord) -> bool:
    """Whether a RUNNING submitted run's Ray job has ended (its driver is gone); UsageError while it runs."""
    submitted = bool(record.job_id and record.cluster_address)
    check, view = decide_driver_job(record.state, submitted, job_status=None), None
    if check == DriverJobCheck.ASK_JOB:
        view = job_view(str(record.cluster_address), str(record.job_id))
        check = decide_driver_job(record.state, submitted, view.status)
    if check == DriverJobCheck.NOT_NEEDED:
        return False
    if check == DriverJobCheck.DRIVER_GONE:
        return True
    if check == DriverJobCheck.UNREACHABLE:
        raise UsageError(
            f"run {record.run_id} is RUNNING and its Ray job {record.job_id} cannot be asked "
            f"({view.message if view else None}); pass --force if you know its driver is gone"
        )
    raise UsageError(
        f"run {record.run_id} is running: its Ray job {record.job_id} is {view.status if view else None} on "
        f"{record.cluster_address}; stop it with `kiln stop {record.run_id}` first"
    )
