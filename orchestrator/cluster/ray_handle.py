"""Kiln's handle on Ray itself: start (or join) Ray for a run, its processes in their own session, the
cluster's live and dead nodes, and whether a worker group can be placed on it."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

from orchestrator.cluster.placement import Placement
from orchestrator.config import KilnConfig, UsageError
from trainers import failpoints


def start_ray(cfg: KilnConfig) -> bool:
    """Connect to cluster.address, or start an embedded local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    with ray_processes_in_their_own_session(embedded=cfg.cluster.address is None):
        ray.init(
            # "local", not None: None joins the last `ray start` cluster named in /tmp/ray (or RAY_ADDRESS),
            # and waits forever when that cluster is gone.
            address=cfg.cluster.address or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
            runtime_env={"env_vars": {"WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore", **worker_failpoints()}},
        )
    return True


@contextmanager
def ray_processes_in_their_own_session(embedded: bool):
    """Start the embedded Ray's processes (GCS, raylet, and so its workers) outside the driver's process group.

    `timeout`, systemd and Kubernetes SIGTERM a whole process group: in the driver's group, Ray's control
    processes died at once, the driver lost them while its workers were still committing the preemption
    checkpoint, and Ray ended the driver 60 s later with its run left RUNNING. In a session of their own,
    only the driver gets the signal and stops the workers itself (GracefulStop). They still die with the
    driver: Ray gives each the kernel's parent-death signal, which is why this applies only where Ray can.
    """
    from ray._private import services, utils

    if not (embedded and sys.platform.startswith("linux") and utils.detect_fate_sharing_support()):
        yield
        return
    # Ray starts every process of a local node through this class
    popen: type[services.ConsolePopen] = services.ConsolePopen

    class OwnSessionPopen(services.ConsolePopen):  # the class just read into popen
        def __init__(self, *args, **kwargs):
            kwargs["start_new_session"] = True
            super().__init__(*args, **kwargs)

    # setattr: swapping a module's class for a subclass (and back) is a monkeypatch, not an assignment mypy allows
    setattr(services, "ConsolePopen", OwnSessionPopen)  # noqa: B010
    try:
        yield
    finally:
        setattr(services, "ConsolePopen", popen)  # noqa: B010


def local_resources() -> dict[str, float]:
    """The CPUs (this process may use) and GPUs of this machine, which an embedded Ray gets."""
    import torch

    return {"CPU": float(len(os.sched_getaffinity(0))), "GPU": float(torch.cuda.device_count())}


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def cluster_nodes() -> list[dict]:
    """The resources of each live node of the connected Ray cluster."""
    import ray

    return [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]


def dead_nodes() -> set[str]:
    """Ids of the connected cluster's nodes that Ray has declared dead."""
    import ray

    return {node["NodeID"] for node in ray.nodes() if not node.get("Alive")}


def check_placement(placement: Placement, console: Console) -> None:
    """Fail (UsageError) if the embedded Ray can never place the worker group; warn for a cluster that may grow.

    A cluster at cluster.address may have an autoscaler that adds nodes for pending workers, so its
    shortfall is said but waited out (Ray Train waits for the placement); the embedded Ray never grows.
    """
    problem = placement.problem(cluster_nodes())
    if problem is None:
        return
    if placement.embedded:
        raise UsageError(problem)
    console.print(
        f"[yellow]waiting for {placement.min_workers} workers: {problem}; an autoscaler may add "
        "nodes, otherwise stop with Ctrl-C[/yellow]"
    )


def check_embedded_fits(placement: Placement) -> None:
    """An embedded Ray gets this machine's CPUs and GPUs: a group that can never fit fails before a run exists.

    Other resources (Ray's own accelerator_type:*, say) are Ray's to detect: check_placement sees them.
    """
    if placement.embedded and not _ray_running():
        problem = placement.problem([local_resources()], only_gpus=True)
        if problem:
            raise UsageError(problem)


@contextmanager
def ray_for(
    cfg: KilnConfig, placement: Placement, console: Console, on_unplaced: Callable[[str], None]
) -> Iterator[None]:
    """Ray for this run: started (and shut down after) or joined; the worker group's placement checked."""
    we_started_ray = start_ray(cfg)
    try:
        try:
            check_placement(placement, console)  # what Ray actually reports, after check_embedded_fits' estimate
        except UsageError as exc:
            on_unplaced(str(exc))
            raise
        yield
    finally:
        if we_started_ray:
            import ray

            ray.shutdown()


def worker_failpoints() -> dict[str, str]:
    """Armed failpoints for this driver's Ray workers; none under a Ray job, whose runtime env carries them (Ray
    refuses a driver's env var that its job's runtime env names too)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return {} if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ else failpoints.environment()
