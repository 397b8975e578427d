"""`kiln runs` (every run under a storage root, one row each) and `kiln status` (one run in full)."""

from __future__ import annotations

import argparse

from rich import box
from rich.console import Console
from rich.table import Table


def cmd_runs(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.run.registry import RunRegistry
    from orchestrator.run.submitted import displayed_state

    registry = RunRegistry(args.storage_root)
    records, damaged = registry.list()
    if not records and not damaged:
        console.print(f"no runs under {args.storage_root}")
        return 0
    submitted = [r for r in records if r.job_id and r.cluster_address]
    jobs = job_statuses_by_address({str(r.cluster_address) for r in submitted})
    extra = ("ray job", "job status", "cluster") if submitted else ()
    table = Table(
        "run",
        "state",
        "step",
        "strategy",
        "ckpt",
        "updated (UTC)",
        *extra,
        box=box.SIMPLE_HEAD,
        title=f"runs under {args.storage_root}",
        pad_edge=False,
    )
    for column in table.columns:
        column.no_wrap = True
    for r in records:
        job_cells: tuple[str, ...] = ()
        if extra:
            status = jobs.get(str(r.cluster_address), {}).get(str(r.job_id), "?") if r.job_id else ""
            job_cells = (r.job_id or "-", status or "-", r.cluster_address or "-")
        table.add_row(
            r.run_id,
            displayed_state(r.state, job_cells[1] if job_cells else None),
            f"{r.step}/{r.max_steps}",
            f"{r.strategy} x{r.num_workers}",
            str(r.checkpoint["step"]) if r.checkpoint else "-",
            r.updated[5:16].replace("T", " "),
            *job_cells,
        )
    for entry in damaged:
        table.add_row(entry.run_id, "[red]DAMAGED[/red]", "-", "-", "-", "-", *(["-"] * len(extra)))
    console.print(table)
    for entry in damaged:
        console.print(f"[red]damaged:[/red] {entry.problem}", highlight=False)
    return 0


def job_statuses_by_address(addresses: set[str]) -> dict[str, dict[str, str]]:
    """address -> {job id -> Ray job status}: one request per cluster the listed runs were submitted to."""
    from orchestrator.cluster.jobs import job_statuses

    return {address: job_statuses(address) for address in addresses}


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.run.attempts import describe_ranks
    from orchestrator.run.lifecycle import dumps, status_json
    from orchestrator.run.registry import RunRegistry

    status = status_json(RunRegistry(args.storage_root), args.run)
    if args.json:
        print(dumps(status))
        return 0
    console.print(
        f"[bold]{status['run_id']}[/bold]  {status['state']}  step {status['step']}/"
        f"{status['max_steps']}  ({status['strategy']}, {status['num_workers']} workers)"
    )
    console.print(f"  created {status['created']}, updated {status['updated']}")
    if status["job"]:
        describe_job(status, console)
    ckpt = status["checkpoint"]
    console.print(
        f"  last committed checkpoint: {ckpt['uri'] + ' (step ' + str(ckpt['step']) + ')' if ckpt else 'none'}"
    )
    for name, value in sorted(status["metrics"].items()):
        console.print(f"  {name:<22} {value:.6g}" if isinstance(value, float) else f"  {name:<22} {value}")
    if status["wandb"]:
        w = status["wandb"]
        console.print(f"  wandb: {w['mode']} run {w['run_id']} in {w['dir']}")
    if status["error"]:
        console.print(f"  error: {status['error']}", markup=False, highlight=False)
    for attempt in status["attempts"]:
        console.print("  " + describe_attempt(attempt), markup=False, highlight=False)
    for line in describe_ranks(status["attempts"][-1]) if status["attempts"] else []:  # where the latest ran
        console.print("    " + line, markup=False, highlight=False)
    for note in status["notes"]:
        console.print(f"  note: {note}", markup=False, highlight=False)
    console.print(f"  folder: {status['run_dir']}")
    if status["resume_command"]:
        console.print(f"  resume: {status['resume_command']}")
    return 0


def describe_attempt(attempt: dict) -> str:
    """One line per attempt: when, on what, from which step, how it ended and why."""
    where = f"{attempt.get('world_size', '?')} workers via {attempt.get('launcher') or '?'}"
    if attempt.get("resized_from"):
        where += f" (resized from {attempt['resized_from']} workers)"
    mesh = attempt.get("mesh")
    if mesh:
        where += f", mesh (replicate {mesh['replicate']}, shard {mesh['shard']}, tensor {mesh['tensor']})"
    restored = attempt.get("restored_step")
    origin = f"from step {restored}" if restored is not None else "from scratch"
    if attempt.get("resharded_from"):
        origin += f" (resharded from {attempt['resharded_from']} workers)"
    outcome = attempt.get("outcome", "running")
    line = f"attempt {attempt.get('n')}: {attempt.get('started')} {where}, {origin} -> {outcome}"
    cause = attempt.get("cause") or {}
    if cause.get("summary"):
        line += f": {cause['summary']}"
    details = [
        f"{name} {cause[key]}"
        for name, key in (("node", "node"), ("ray node", "node_id"), ("pid", "pid"), ("exit code", "exit_code"))
        if cause.get(key) is not None
    ]
    return line + (f" [{', '.join(details)}]" if details else "")


def describe_job(status: dict, console: Console) -> None:
    """The Ray job of a submitted run: its id, status and cluster; what a lost driver means."""
    job = status["job"]
    console.print(f"  ray job {job['job_id']}: {job['status']} on {job['address']}", markup=False, highlight=False)
    if status["state"] == "DRIVER_LOST":
        console.print(
            f"  the run's record says {status['recorded_state']} but its Ray job ended "
            f"({job['message'] or 'no message'}): its driver is gone; the resume command below continues it "
            "from its last committed checkpoint",
            markup=False,
            highlight=False,
        )
    elif status["state"] == "NEVER_STARTED":  # Ray's message ends with the last lines of the job's log
        console.print(
            f"  its Ray job ended before it started the run ({job['message'] or 'no message'}): the run never "
            f"started on the cluster, and resuming it would fail the same way; fix what the job's log says "
            f"(kiln logs {status['run_id']}) and submit again",
            markup=False,
            highlight=False,
        )
    elif job["status"] == "UNREACHABLE":
        console.print(f"  (cannot ask the cluster: {job['message']})", markup=False, highlight=False)
