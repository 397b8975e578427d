"""Runs driven by a Ray job on a cluster (`kiln submit`): Ray's Jobs SDK; what to make of it: run/submitted.py.

The run is registered by the submitter and continued by the job's entrypoint (`kiln start RUN`), so
a submitted run has one id, one folder and one record, like any other. Ray owns the job (its status,
its driver's log, stopping it); Kiln keeps the job id in run.json and asks Ray when it needs to know.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from data_pipeline import storage
from data_pipeline.redaction import redact_text
from orchestrator.config import UsageError
from trainers import failpoints
from trainers.run.state import RunState

# Ray's job status for a job whose driver has exited. NOT_FOUND: the cluster does not know the job (its head
# was replaced): nothing there drives the run. UNREACHABLE: the cluster could not be asked.
TERMINAL_JOB_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED", "NOT_FOUND"})
UNREACHABLE = "UNREACHABLE"
NOT_FOUND = "NOT_FOUND"

JOB_PREFIX = "kiln-"
ADDRESS_ENV = "RAY_ADDRESS"
# Installed code runs as `kiln`; code shipped with --working-dir must be imported from the job's folder.
INSTALLED_ENTRYPOINT = ("kiln",)
WORKING_DIR_ENTRYPOINT = ("python", "-m", "orchestrator.cli")
# Never uploaded with --working-dir: environments, run folders and git history are large and local.
WORKING_DIR_EXCLUDES = [
    *(".venv", ".git", "kiln-runs", "**/__pycache__", "*.egg-info"),
    *(".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "wandb"),
]


@dataclass(frozen=True)
class JobView:
    """What Ray says about a run's job now: status (or UNREACHABLE), its message and the driver's exit code."""

    job_id: str
    address: str
    status: str
    message: str | None = None
    driver_exit_code: int | None = None
    driver_pid: int | None = None

    def as_json(self) -> dict:
        """The `job` object of `kiln status --json`."""
        return {
            "job_id": self.job_id,
            "address": self.address,
            "status": self.status,
            "message": self.message,
            "driver_exit_code": self.driver_exit_code,
        }


def jobs_address(flag: str | None, env: str | None, configured: str | None) -> str:
    """The cluster to submit to: --address, else $RAY_ADDRESS, else cluster.address."""
    for value in (flag, env, configured):
        if value:
            return value
    raise UsageError(
        "no cluster to submit to: pass --address http://HEAD:8265 (the Ray dashboard's Jobs API), "
        f"set {ADDRESS_ENV}, or set cluster.address"
    )


def shared_root_warning(root: str) -> str | None:
    """A warning for a storage.root (as the user typed it) that every node must see; UsageError if it can't be."""
    if not storage.is_local(root):
        return None
    path = root.removeprefix("file://")
    if not path.startswith("/"):
        raise UsageError(
            f"storage.root={root} is a relative local path: a submitted run's driver and workers run on the "
            "cluster's nodes, where it means something else; use s3://BUCKET/PREFIX (recommended) or an "
            "absolute path on a filesystem every node mounts"
        )
    return (
        f"storage.root={root} is a local folder: every node of the cluster must see it at that path "
        "(a shared filesystem); s3:// is the recommended root for a cluster"
    )


def next_job_id(run_id: str, previous: str | None) -> str:
    """The Ray submission id for a run's next job: kiln-RUN, then kiln-RUN-2, -3 for each resubmission."""
    first = f"{JOB_PREFIX}{run_id}"
    if not previous or not previous.startswith(first):
        return first
    suffix = previous[len(first) :].lstrip("-")
    return f"{first}-{int(suffix) + 1 if suffix.isdigit() else 2}"


def entrypoint(args: list[str], shipped_code: bool) -> str:
    """The job's shell command: a kiln subcommand with its arguments, each quoted."""
    program = WORKING_DIR_ENTRYPOINT if shipped_code else INSTALLED_ENTRYPOINT
    return shlex.join([*program, *args])


def runtime_env(working_dir: str | None) -> dict | None:
    """The job's runtime env: only the code, when shipped, and armed failpoints; never a secret (the nodes hold
    those)."""
    armed = failpoints.environment()  # empty unless a test armed them (trainers/failpoints.py)
    env: dict = {"env_vars": armed} if armed else {}
    if working_dir is None:
        return env or None
    return {"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES, **env}


def exit_code_of(driver_exit_code: int | None, state: str) -> int:
    """`kiln submit --follow`'s exit code: the driver's own (as `kiln train`'s), else from the run's state."""
    if driver_exit_code is not None and driver_exit_code >= 0:
        return driver_exit_code
    return {RunState.SUCCEEDED: 0, RunState.PREEMPTED: 3}.get(RunState(state), 1)


@contextmanager
def talking_to(address: str) -> Iterator[None]:
    """Turn what the Jobs SDK raises into one line that names the cluster and says what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise UsageError(
            f"the Ray Jobs API at {address} refused the request: the cluster has token authentication on; "
            "give this machine the cluster's token (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or "
            "~/.ray/auth_token; `ray get-auth-token` on the head prints it)"
        ) from None
    except ConnectionError as exc:
        raise UsageError(
            f"cannot reach the Ray Jobs API at {address} ({first_line(exc)}); is the cluster up and its "
            "dashboard port (8265) reachable from here (a port-forward or SSH tunnel)?"
        ) from None
    except RuntimeError as exc:
        raise UsageError(f"the Ray Jobs API at {address}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def client(address: str):
    """A JobSubmissionClient for address (the token comes from Ray's usual environment)."""
    from ray.job_submission import JobSubmissionClient

    # The SDK logs each websocket open/close, and --working-dir packaging each file it skips, at INFO.
    for name in ("ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging", "ray.dashboard.modules"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with talking_to(address):
        return JobSubmissionClient(address)


def submit_job(address: str, job_id: str, command: str, metadata: dict[str, str], working_dir: str | None) -> str:
    """Submit the job; returns its submission id."""
    jobs = client(address)
    with talking_to(address):
        return jobs.submit_job(
            entrypoint=command,
            submission_id=job_id,
            runtime_env=runtime_env(working_dir),
            metadata=metadata,
        )


def job_view(address: str, job_id: str) -> JobView:
    """Ray's view of the job now; status UNREACHABLE (with why) if the cluster cannot be asked."""
    try:
        jobs = client(address)
        with talking_to(address):
            info = jobs.get_job_info(job_id)
    except UsageError as exc:
        status = NOT_FOUND if "does not exist" in str(exc) else UNREACHABLE
        return JobView(job_id, address, status, str(exc))
    driver = getattr(info, "driver_info", None)
    pid = getattr(driver, "pid", None)
    return JobView(
        job_id,
        address,
        str(getattr(info.status, "value", info.status)),
        info.message,
        info.driver_exit_code,
        int(pid) if pid else None,
    )


def job_statuses(address: str) -> dict[str, str]:
    """submission id -> status of every job the cluster knows (one request); empty if unreachable."""
    try:
        jobs = client(address)
        with talking_to(address):
            return {
                job.submission_id: str(getattr(job.status, "value", job.status))
                for job in jobs.list_jobs()
                if job.submission_id
            }
    except UsageError:
        return {}


def follow_job_logs(address: str, job_id: str, write: Callable[[str], None]) -> None:
    """Stream the job driver's log from the start until the job ends."""
    jobs = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            write(chunk)

    with talking_to(address):
        asyncio.run(tail())


def job_logs(address: str, job_id: str) -> str:
    """The job driver's log so far."""
    jobs = client(address)
    with talking_to(address):
        return jobs.get_job_logs(job_id)


def stop_job(address: str, job_id: str) -> bool:
    """Ask Ray to stop the job now (SIGTERM to its driver, then SIGKILL); False if it had already ended."""
    jobs = client(address)
    with talking_to(address):
        return bool(jobs.stop_job(job_id))


def shipped_code(working_dir: str | None) -> str | None:
    """--working-dir as an absolute folder (the code Ray uploads with the job), or None."""
    if working_dir is None:
        return None
    path = os.path.abspath(working_dir)
    if not os.path.isdir(os.path.join(path, "orchestrator")):
        raise UsageError(
            f"--working-dir {working_dir}: not a Kiln checkout (no orchestrator/ in {path}); give the folder "
            "holding pyproject.toml, or leave it out when Kiln is installed in the cluster's image"
        )
    return path


def write_out(text: str) -> None:
    """Stream text to stdout through the redaction."""
    sys.stdout.write(redact_text(text))
    sys.stdout.flush()
