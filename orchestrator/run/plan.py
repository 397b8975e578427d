"""The plan of one run: what it needs, resolved and checked before anything starts (orchestrator/run/planning.py
builds it). Launching consumes it: the registry creates the run from it (orchestrator/run/lifecycle.py), Ray is
given its placement, and every worker is handed `data` instead of opening and checking the data again."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.cluster.placement import Placement
from orchestrator.config import ClusterConfig, KilnConfig
from orchestrator.run.init_source import InitSource
from trainers.run_data import RunData


@dataclass(frozen=True)
class RunPlan:
    """Everything resolved for one run before it starts; launching reads it and re-derives none of it."""

    cfg: KilnConfig  # finalized: run id, data.path, task.labels, model.init_from (the run's own copy) filled in
    data: RunData | None  # None only for a submitted run whose built-in corpus the cluster prepares
    init: InitSource  # the model.init_from copy to install once the run's folder exists
    placement: Placement


def placement_of(cluster: ClusterConfig) -> Placement:
    """The worker group cluster.* asks for."""
    return Placement(
        min_workers=cluster.min_workers,
        cpus_per_worker=cluster.cpus_per_worker,
        use_gpu=cluster.use_gpu,
        extra=tuple(cluster.resources_per_worker.items()),
        strategy=cluster.placement,
        embedded=cluster.address is None,
    )
