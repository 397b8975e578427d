"""The root schema: the workers' sections (trainers.config) plus `cluster`, registered with Hydra as kiln_schema.

Each package owns the dataclasses of its own sections; this module joins them and checks what spans
sections (batch math at every worker count, fp16 needing GPUs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from data_pipeline.config import default_storage_root
from trainers.config import WorkerConfig, one_of, require

# cluster.placement -> Ray Train's ScalingConfig.placement_strategy is the upper-case spelling.
PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")


@dataclass
class ClusterConfig:
    """Where workers run: an embedded local Ray (address unset) or an existing cluster."""

    address: str | None = None
    # N workers, or [MIN, MAX]: Ray Train's elastic training (starts with what it can get from MIN up,
    # goes on with fewer when a node is lost, grows back when nodes return). The math does not change
    # with the count: the global batch is kept by gradient accumulation and the data cursor is global.
    # Any: OmegaConf's structured configs cannot spell `int | list[int]`; __post_init__ checks it (worker_count).
    num_workers: Any = 2
    # Elastic runs only: how often Ray Train looks for room to grow the group (Ray's default: 60 s).
    resize_check_s: float | None = None
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_failures: int = 2  # worker-group restarts from the last committed checkpoint
    # How Ray Train spreads the workers over nodes: Ray's PACK/SPREAD (soft: best effort) or
    # STRICT_PACK (all on one node) / STRICT_SPREAD (each on its own node), in lower case.
    placement: str = "pack"
    # Extra Ray resources each worker needs beyond cluster.cpus_per_worker (and the GPU of use_gpu), e.g.
    # `cluster.resources_per_worker={GPU:2}`, `cluster.resources_per_worker.my_resource=1`. Hydra takes a
    # ':' in a key only after a backslash (quoted keys do not parse), so in a shell:
    #   kiln train 'cluster.resources_per_worker={GPU:1,accelerator_type\:H100:0.001}'
    # An override adds to (merges into) the dict, as Hydra does with dicts.
    resources_per_worker: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_workers = worker_count(self.num_workers)
        require(
            self.resize_check_s is None or self.elastic,
            f"cluster.resize_check_s={self.resize_check_s} is ignored with a fixed cluster.num_workers="
            f"{self.num_workers}: give cluster.num_workers=[MIN,MAX] for an elastic run, or remove it",
        )
        require(
            self.resize_check_s is None or self.resize_check_s > 0,
            f"cluster.resize_check_s must be > 0 seconds, got {self.resize_check_s}",
        )
        require(self.cpus_per_worker > 0, f"cluster.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        require(self.max_failures >= -1, f"cluster.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        one_of("cluster.placement", self.placement, PLACEMENTS)
        self.check_resources()

    @property
    def elastic(self) -> bool:
        """Whether the worker count may change while the run goes on (cluster.num_workers=[MIN,MAX])."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with."""
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the run trains with."""
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers

    def check_resources(self) -> None:
        """resources_per_worker: positive amounts, and no key that another cluster setting owns."""
        for name, amount in self.resources_per_worker.items():
            key = f"cluster.resources_per_worker.{name}"
            number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
            require(number and amount > 0, f"{key} must be a number > 0 (fractions are allowed), got {amount!r}")
            require(
                name != "CPU",
                f"{key} conflicts with cluster.cpus_per_worker: set cluster.cpus_per_worker={amount:g} instead",
            )
            require(
                name != "GPU" or self.use_gpu,
                f"{key} is ignored with cluster.use_gpu=false: add cluster.use_gpu=true or remove it",
            )


def worker_count(value: object) -> int | list[int]:
    """cluster.num_workers as given: N > 0, or [MIN, MAX] with 0 < MIN <= MAX (MIN == MAX is just N)."""
    if not isinstance(value, str) and isinstance(value, Iterable):
        bounds = list(value)
        usable = len(bounds) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        require(
            usable and 0 < bounds[0] <= bounds[1],
            f"cluster.num_workers={bounds} must be N or [MIN,MAX] with 0 < MIN <= MAX (an elastic run), "
            "e.g. cluster.num_workers=[2,8]",
        )
        return bounds[0] if bounds[0] == bounds[1] else bounds
    count = value if isinstance(value, int) and not isinstance(value, bool) else 0
    require(count > 0, f"cluster.num_workers must be > 0 (or [MIN,MAX] for an elastic run), got {value!r}")
    return count


@dataclass
class KilnConfig(WorkerConfig):
    """A complete, validated training run: what the workers run on, and where they run."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.parallel.tensor == 1 or self.cluster.placement in ("pack", "strict_pack"),
            f"parallel.tensor={self.parallel.tensor} with cluster.placement={self.cluster.placement}: a tensor group "
            "must share a node (its collectives run every layer); use cluster.placement=pack or strict_pack",
        )
        require(
            not (self.cluster.elastic and self.parallel.enabled),
            f"cluster.num_workers={self.cluster.num_workers} (elastic) with parallel.tensor/parallel.replicate: a "
            "mesh has a fixed shape; give cluster.num_workers one count",
        )
        for workers in range(self.cluster.min_workers, self.cluster.max_workers + 1):
            try:
                self.grad_accum_at(workers)  # every count an elastic run may train with keeps the global batch
            except ValueError as exc:
                if not self.cluster.elastic:
                    raise
                raise ValueError(
                    f"{exc} (an elastic run with cluster.num_workers={self.cluster.num_workers} may train with "
                    f"any count from {self.cluster.min_workers} to {self.cluster.max_workers})"
                ) from None
        require(
            self.strategy.precision != "fp16" or self.cluster.use_gpu,
            "strategy.precision=fp16 needs GPUs (cluster.use_gpu=true) for loss scaling; "
            "on CPU use strategy.precision=bf16 or fp32",
        )

    @property
    def grad_accum(self) -> int:
        """Micro-batches each worker accumulates per optimizer step (at the largest worker count)."""
        return self.grad_accum_at(self.cluster.max_workers)


ConfigStore.instance().store(name="kiln_schema", node=KilnConfig)
# conf/storage/local.yaml reads its default through this, so the yaml and the CLI share one definition.
OmegaConf.register_new_resolver("kiln.default_storage_root", default_storage_root, replace=True)
