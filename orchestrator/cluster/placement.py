"""Can the cluster ever place the worker group? Asked once, before training, instead of waiting forever."""

from __future__ import annotations

from dataclasses import dataclass

# Ray counts resources in fixed point (1/10000 of a unit): so must we, or 1.0 // 0.1 gives 9 workers.
UNITS = 10_000
# Ray's placement strategies that are rules rather than preferences; PACK and SPREAD are best effort.
STRICT = ("strict_pack", "strict_spread")


def worker_shape(cpus_per_worker: float, use_gpu: bool, extra: dict[str, float] | None = None) -> dict[str, float]:
    """What one Ray Train worker asks for: CPUs, 1 GPU with use_gpu (unless extra names the count), and extra."""
    shape = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    return shape | {name: float(amount) for name, amount in (extra or {}).items()}


def units(amount: float) -> int:
    """A resource amount in Ray's fixed-point units."""
    return round(amount * UNITS)


def fits_on(shape: dict[str, float], resources: dict) -> int:
    """How many workers of that shape fit on one node with these resources."""
    fits = [units(resources.get(name, 0)) // max(units(amount), 1) for name, amount in shape.items() if amount > 0]
    return min(fits) if fits else 0


def placeable_workers(shape: dict[str, float], nodes: list[dict], placement: str = "pack") -> int:
    """How many workers of that shape the placement can put on the nodes (a worker never spans two nodes)."""
    per_node = [fits_on(shape, resources) for resources in nodes]
    if placement == "strict_pack":
        return max(per_node, default=0)
    if placement == "strict_spread":
        return sum(1 for fits in per_node if fits)
    return sum(per_node)


def missing_resources(shape: dict[str, float], nodes: list[dict]) -> list[str]:
    """The extra resources of the shape that no node has enough of for even one worker."""
    return [
        name
        for name, amount in shape.items()
        if name not in ("CPU", "GPU") and not any(units(n.get(name, 0)) >= units(amount) for n in nodes)
    ]


def offered(nodes: list[dict]) -> str:
    """Every resource the nodes have, with the most one node has (Ray's node:<ip> markers left out)."""
    names = sorted({name for resources in nodes for name in resources if not name.startswith("node:")})
    return ", ".join(f"{name} ({max(n.get(name, 0) for n in nodes):g})" for name in names) or "none"


def override_spelling(resources: dict[str, float]) -> str:
    r"""Resources as a user writes them on the command line: `{GPU:1,accelerator_type\:H100:0.001}`."""
    pairs = [name.replace(":", "\\:") + f":{amount:g}" for name, amount in resources.items()]
    return "{" + ",".join(pairs) + "}"


def describe_shape(shape: dict[str, float]) -> str:
    """One worker's resources in words: `2 CPUs, 1 GPU and 0.001 accelerator_type:H100`."""
    words = [
        f"{amount:g} {name}{'s' if name in ('CPU', 'GPU') and amount != 1 else ''}" for name, amount in shape.items()
    ]
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


def describe(nodes: list[dict]) -> str:
    """The cluster's CPUs and GPUs in words."""
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    largest = max((n.get("CPU", 0) for n in nodes), default=0)
    where = f" on {len(nodes)} nodes (at most {largest:g} CPUs on one)" if len(nodes) > 1 else ""
    return f"{cpus:g} CPUs and {gpus:g} GPUs{where}"


def placement_problem(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    nodes: list[dict],
    extra: dict[str, float] | None = None,
    placement: str = "pack",
) -> str | None:
    """Why num_workers workers can never all be placed on these nodes' resources, or None if they can.

    extra is cluster.resources_per_worker, placement cluster.placement (only the strict ones constrain).
    """
    shape = worker_shape(cpus_per_worker, use_gpu, extra)
    missing = missing_resources(shape, nodes)
    if missing:
        return (
            "; ".join(
                f"cluster.resources_per_worker.{name}={shape[name]:g} asks each worker for a resource that no node of "
                f"the Ray cluster has that much of"
                for name in missing
            )
            + f"; the nodes offer {offered(nodes)}: fix the name (it is case-sensitive) or remove it"
        )
    fits = placeable_workers(shape, nodes)
    if fits >= num_workers:
        return strict_problem(num_workers, shape, nodes, placement)
    settings = f"cluster.num_workers={num_workers} with cluster.cpus_per_worker={cpus_per_worker:g}"
    settings += " and cluster.use_gpu=true" if use_gpu else ""
    settings += f" and cluster.resources_per_worker={override_spelling(extra)}" if extra else ""
    return (
        f"{settings} needs {num_workers} workers of {describe_shape(shape)} each, but the "
        f"Ray cluster has {describe(nodes)}: room for {fits}; {remedy(fits, shape, nodes)}"
    )


def strict_problem(num_workers: int, shape: dict[str, float], nodes: list[dict], placement: str) -> str | None:
    """Why a strict placement cannot hold workers that fit the cluster as a whole, or None."""
    if placement not in STRICT:
        return None
    fits = placeable_workers(shape, nodes, placement)
    if fits >= num_workers:
        return None
    if placement == "strict_pack":
        rule = f"puts all {num_workers} workers on one node, but one node has room for at most {fits}"
    else:
        rule = (
            f"puts each of the {num_workers} workers on a node of its own, "
            f"but only {fits} of the {len(nodes)} nodes have room for one"
        )
    return (
        f"cluster.placement={placement} {rule} (of {describe_shape(shape)}; the Ray cluster has "
        f"{describe(nodes)}); set cluster.num_workers={fits} or less, "
        f"or cluster.placement={placement.removeprefix('strict_')} (best effort)"
    )


def remedy(fits: int, shape: dict[str, float], nodes: list[dict]) -> str:
    """What to change so the workers fit."""
    if fits:
        return f"set cluster.num_workers={fits} or less (or a bigger cluster with cluster.address)"
    gpus, most_gpus = shape.get("GPU", 0), max((n.get("GPU", 0) for n in nodes), default=0)
    if gpus and most_gpus < gpus:
        if most_gpus:  # more than one GPU asked for, through cluster.resources_per_worker.GPU
            return f"set cluster.resources_per_worker.GPU={most_gpus:g} or less (or a cluster with bigger nodes)"
        return "set cluster.use_gpu=false, or cluster.address to a cluster with GPUs"
    rest = {name: amount for name, amount in shape.items() if name != "CPU"}
    able = [n for n in nodes if all(units(n.get(name, 0)) >= units(amount) for name, amount in rest.items())]
    if not able:
        return f"no single node has {describe_shape(rest)} at once (or use a cluster that does with cluster.address)"
    largest = max(n.get("CPU", 0) for n in able)
    return f"set cluster.cpus_per_worker={largest:g} or less (or a bigger cluster with cluster.address)"


@dataclass(frozen=True)
class Placement:
    """The worker group a run asks Ray for, resolved once from cluster.*: checked here, then on Ray's nodes."""

    min_workers: int  # an elastic run starts with what it gets from MIN up
    cpus_per_worker: float
    use_gpu: bool
    extra: tuple[tuple[str, float], ...]  # cluster.resources_per_worker, in its order
    strategy: str  # cluster.placement
    embedded: bool  # no cluster.address: an embedded Ray of this machine, which never grows

    def problem(self, nodes: list[dict], only_gpus: bool = False) -> str | None:
        """Why the group can never be placed on these nodes, or None; only_gpus leaves other extras to Ray."""
        extra = {name: amount for name, amount in self.extra if name == "GPU" or not only_gpus}
        return placement_problem(
            self.min_workers, self.cpus_per_worker, self.use_gpu, nodes, extra=extra, placement=self.strategy
        )
