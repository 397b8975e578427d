"""A sweep on a Ray cluster: its driver (`kiln sweep start SWEEP`) runs as a Ray job, as `kiln submit` does."""

from __future__ import annotations

import argparse
import os

from rich.console import Console

from orchestrator.cluster.jobs import (
    ADDRESS_ENV,
    client,
    entrypoint,
    follow_job_logs,
    job_view,
    jobs_address,
    next_job_id,
    shared_root_warning,
    shipped_code,
    submit_job,
    write_out,
)
from orchestrator.config import UsageError
from orchestrator.sweep import record as sweeps
from orchestrator.sweep.record import SweepRecord, SweepState

ON_THE_CLUSTER_EXIT = {SweepState.FINISHED: 0, SweepState.STOPPED: 3}


def submit_sweep(record: SweepRecord, args: argparse.Namespace, console: Console) -> int:
    """Record the sweep PENDING and submit its driver as Ray job kiln-<sweep_id>."""
    address = jobs_address(args.address, os.environ.get(ADDRESS_ENV), None)
    warning = shared_root_warning(record.storage_root)
    working_dir = shipped_code(args.working_dir)
    client(address)  # reachable and authorised, before a sweep is recorded that no job would ever drive
    record.state, record.cluster_address = SweepState.PENDING, address
    record.job_id = next_job_id(record.sweep_id, None)
    sweeps.create(record.storage_root, record)
    if warning:
        console.print(f"[yellow]warning: {warning}[/yellow]")
    return launch(record, address, working_dir, args.follow, console, retry_failed=False)


def resubmit_sweep(record: SweepRecord, args: argparse.Namespace, console: Console) -> int:
    """`kiln sweep resume SWEEP --address URL`: the sweep's driver again, as a new Ray job."""
    check_job_ended(record)
    working_dir = shipped_code(args.working_dir)
    client(args.address)
    record.job_id, record.cluster_address = next_job_id(record.sweep_id, record.job_id), args.address
    record.state = SweepState.PENDING
    sweeps.clear_sweep_stop(record.storage_root, record.sweep_id)  # the stop this resume undoes
    sweeps.save(record.storage_root, record)
    return launch(record, args.address, working_dir, args.follow, console, retry_failed=args.retry_failed)


def check_job_ended(record: SweepRecord) -> None:
    """UsageError while a submitted sweep's Ray job may still drive it (it would be driven twice)."""
    if record.job_id and record.cluster_address and record.state in (SweepState.RUNNING, SweepState.PENDING):
        view = job_view(record.cluster_address, record.job_id)
        if view.status in ("PENDING", "RUNNING"):
            raise UsageError(
                f"sweep {record.sweep_id} is running: its Ray job {record.job_id} is {view.status}; stop it with "
                f"`kiln sweep stop {record.sweep_id}` first"
            )


def launch(
    record: SweepRecord, address: str, working_dir: str | None, follow: bool, console: Console, retry_failed: bool
) -> int:
    """Submit the job that runs `kiln sweep start`; a refused submission ends the sweep FAILED."""
    root = record.storage_root
    arguments = ["sweep", "start", record.sweep_id, "--storage-root", root]
    command = entrypoint(arguments + (["--retry-failed"] if retry_failed else []), bool(working_dir))
    metadata = {"kiln_sweep_id": record.sweep_id, "kiln_storage_root": root}
    try:
        submit_job(address, str(record.job_id), command, metadata, working_dir)
    except BaseException as exc:
        record.state, record.error = SweepState.FAILED, f"the Ray job could not be submitted to {address}: {exc}"
        sweeps.save(root, record)
        raise
    flag = f" --storage-root {root}"
    console.print(
        f"sweep [bold]{record.sweep_id}[/bold] submitted to {address} as Ray job [bold]{record.job_id}[/bold]"
    )
    console.print(f"status:  kiln sweep status {record.sweep_id}{flag}")
    console.print(f"stop:    kiln sweep stop {record.sweep_id}{flag}")
    if not follow:
        return 0
    follow_job_logs(address, str(record.job_id), write_out)
    view = job_view(address, str(record.job_id))
    if view.driver_exit_code is not None and view.driver_exit_code >= 0:
        return view.driver_exit_code
    return ON_THE_CLUSTER_EXIT.get(sweeps.load(root, record.sweep_id).state, 1)
