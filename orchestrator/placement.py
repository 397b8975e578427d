"""Can the cluster ever place the worker group? Asked once, before training, instead of waiting forever."""

from __future__ import annotations


def worker_shape(cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """What one Ray Train worker asks for (ScalingConfig gives a GPU worker 1 GPU)."""
    return {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}


def placeable_workers(shape: dict[str, float], nodes: list[dict]) -> int:
    """How many workers of that shape fit on the nodes (a worker never spans two nodes)."""
    total = 0
    for resources in nodes:
        fits = [int(resources.get(name, 0) // amount) for name, amount in shape.items() if amount > 0]
        total += min(fits) if fits else 0
    return total


def describe(nodes: list[dict]) -> str:
    """The cluster's CPUs and GPUs in words."""
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    largest = max((n.get("CPU", 0) for n in nodes), default=0)
    where = f" on {len(nodes)} nodes (at most {largest:g} CPUs on one)" if len(nodes) > 1 else ""
    return f"{cpus:g} CPUs and {gpus:g} GPUs{where}"


def placement_problem(num_workers: int, cpus_per_worker: float, use_gpu: bool, nodes: list[dict]) -> str | None:
    """Why num_workers workers can never all be placed on these nodes' resources, or None if they can."""
    shape = worker_shape(cpus_per_worker, use_gpu)
    fits = placeable_workers(shape, nodes)
    if fits >= num_workers:
        return None
    wants = f"{cpus_per_worker:g} CPU{'s' if cpus_per_worker != 1 else ''}" + (" and 1 GPU" if use_gpu else "")
    return (
        f"cluster.num_workers={num_workers} with cluster.cpus_per_worker={cpus_per_worker:g}"
        f"{' and cluster.use_gpu=true' if use_gpu else ''} needs {num_workers} workers of {wants} each, but the "
        f"Ray cluster has {describe(nodes)}: room for {fits}; {remedy(fits, cpus_per_worker, use_gpu, nodes)}"
    )


def remedy(fits: int, cpus_per_worker: float, use_gpu: bool, nodes: list[dict]) -> str:
    """What to change so the workers fit."""
    if fits:
        return f"set cluster.num_workers={fits} or less (or a bigger cluster with cluster.address)"
    if use_gpu and not any(n.get("GPU", 0) >= 1 for n in nodes):
        return "set cluster.use_gpu=false, or cluster.address to a cluster with GPUs"
    largest = max((n.get("CPU", 0) for n in nodes), default=0)
    return f"set cluster.cpus_per_worker={largest:g} or less (or a bigger cluster with cluster.address)"
