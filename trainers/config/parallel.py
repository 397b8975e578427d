"""The parallel section: how the world is laid out as one DeviceMesh (replicate R, shard S, tensor T).

`strategy=fsdp` with `parallel.tensor=T` applies tensor (and sequence) parallelism inside each group of T
consecutive ranks, and `parallel.replicate=R` makes FSDP2 shard within S = world / (R*T) ranks and replicate
across R such groups (HSDP). The data-parallel degree, which the batch math divides by, is R*S. Torch-free:
the driver checks every combination before anything starts; trainers/parallel.py builds the mesh itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.config.checks import ConfigError, require

# Tensor parallel needs a plan per architecture: the Llama-family decoders (dense MLPs) have one.
TENSOR_PARALLEL_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TENSOR_PARALLEL_TASKS = ("causal_lm", "sft")
MESH_DIMS = ("replicate", "shard", "tensor")


@dataclass(frozen=True)
class MeshShape:
    """The world as (replicate, shard, tensor); rank r sits at row-major coordinates of r."""

    replicate: int
    shard: int
    tensor: int

    @property
    def world_size(self) -> int:
        """How many ranks the mesh has."""
        return self.replicate * self.shard * self.tensor

    @property
    def data_parallel(self) -> int:
        """Ranks that read different batches: one per tensor group."""
        return self.replicate * self.shard

    @property
    def is_trivial(self) -> bool:
        """One data-parallel axis, no tensor parallel: what FSDP2 alone does."""
        return self.replicate == 1 and self.tensor == 1

    def coordinates(self, rank: int) -> dict[str, int]:
        """rank's place in the mesh, by dimension name."""
        tensor, rest = rank % self.tensor, rank // self.tensor
        return {"replicate": rest // self.shard, "shard": rest % self.shard, "tensor": tensor}

    def data_rank(self, rank: int) -> int:
        """Which data-parallel shard of the batch rank reads (the same for a whole tensor group)."""
        return rank // self.tensor

    def as_json(self) -> dict[str, int]:
        """{"replicate", "shard", "tensor"}: as checkpoint manifests and the run's events record it."""
        return {"replicate": self.replicate, "shard": self.shard, "tensor": self.tensor}

    def __str__(self) -> str:
        return f"(replicate {self.replicate}, shard {self.shard}, tensor {self.tensor})"


@dataclass
class ParallelConfig:
    """parallel.tensor (T) and parallel.replicate (R): the mesh beyond one data-parallel axis (strategy=fsdp)."""

    tensor: int = 1
    replicate: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor", "replicate"):
            value = getattr(self, name)
            require(value >= 1, f"parallel.{name} must be >= 1 (1: off), got {value}")

    @property
    def enabled(self) -> bool:
        """Whether the mesh has more than FSDP2's one axis."""
        return self.tensor > 1 or self.replicate > 1

    def mesh(self, world_size: int) -> MeshShape:
        """The mesh of world_size ranks; ConfigError naming the mismatch when R*T does not divide it."""
        per_shard = self.replicate * self.tensor
        if world_size % per_shard:
            raise ConfigError(
                f"parallel.replicate ({self.replicate}) x parallel.tensor ({self.tensor}) = {per_shard} must divide "
                f"the {world_size} workers (cluster.num_workers): the mesh is replicate x shard x tensor"
            )
        return MeshShape(self.replicate, world_size // per_shard, self.tensor)


def check_parallel(
    parallel: ParallelConfig,
    *,
    strategy: str,
    arch: str | None,
    task: str,
    lora: bool,
    heads: tuple[int, int] | None,
    compiled: bool = False,
) -> None:
    """Every setting a mesh cannot work with, refused in one line naming the fix.

    arch and heads ((query heads, key/value heads)) are None when a model.init_from folder decides them; the
    worker checks the folder's own (trainers/parallel.py).
    """
    if not parallel.enabled:
        return
    require(
        strategy == "fsdp",
        f"parallel.tensor/parallel.replicate with strategy={strategy}: the mesh composes with FSDP2 only; "
        "use strategy=fsdp (or parallel.tensor=1 parallel.replicate=1)",
    )
    if parallel.tensor == 1:
        return
    require(
        task in TENSOR_PARALLEL_TASKS,
        f"parallel.tensor={parallel.tensor} with task={task}: tensor parallel splits a causal LM's layers and "
        f"head; use task={' or task='.join(TENSOR_PARALLEL_TASKS)}, or parallel.tensor=1",
    )
    # Compiled blocks over tensor-parallel DTensors trained other losses than uncompiled ones (3e-4 off at step 2 on
    # the tests' tiny Llama; compiled FSDP alone is exact): refused rather than silently different.
    require(
        not compiled,
        f"model.compile with parallel.tensor={parallel.tensor}: Kiln does not compile tensor-parallel blocks "
        "(their losses drift from the uncompiled model's); use model.compile=false, or parallel.tensor=1",
    )
    require(
        not lora,
        f"parallel.tensor={parallel.tensor} with model.lora: peft's adapters do not shard across a tensor group; "
        "use parallel.tensor=1 for LoRA (FSDP2 shards it)",
    )
    if arch is not None:
        require(
            arch in TENSOR_PARALLEL_ARCHS,
            f"parallel.tensor={parallel.tensor} with model.arch={arch}: Kiln has tensor-parallel plans for "
            f"{', '.join(TENSOR_PARALLEL_ARCHS)}; use one of them, or parallel.tensor=1",
        )
    if heads is not None:
        check_heads(parallel.tensor, *heads, where="model.n_head/model.n_kv_head")


def check_model_splits(tensor: int, arch: str, heads: int, kv_heads: int, where: str) -> None:
    """A model (its transformers model_type and heads) that parallel.tensor can split; ConfigError naming where."""
    require(
        arch in TENSOR_PARALLEL_ARCHS,
        f"parallel.tensor={tensor} with a {arch} model ({where}): Kiln has tensor-parallel plans for "
        f"{', '.join(TENSOR_PARALLEL_ARCHS)}; use parallel.tensor=1",
    )
    check_heads(tensor, heads, kv_heads, where)


def check_heads(tensor: int, heads: int, kv_heads: int, where: str) -> None:
    """Each rank of a tensor group takes whole query and key/value heads."""
    require(
        heads % tensor == 0 and kv_heads % tensor == 0,
        f"parallel.tensor={tensor} must divide the {heads} query and {kv_heads} key/value heads ({where}): "
        "each rank of a tensor group computes whole heads",
    )


def tensor_group_problem(mesh: MeshShape, nodes: list[str]) -> str | None:
    """Why the ranks' nodes (nodes[rank]) split a tensor group across machines, or None when none is split."""
    for first in range(0, len(nodes), mesh.tensor):
        group = nodes[first : first + mesh.tensor]
        if len(set(group)) > 1:
            spans = ", ".join(sorted(set(group)))
            return (
                f"tensor group of ranks {first}-{first + mesh.tensor - 1} spans nodes {spans}: each node must hold "
                f"a multiple of parallel.tensor={mesh.tensor} workers (cluster.placement=strict_pack keeps the group "
                "on one node; cluster.cpus_per_worker or cluster.resources_per_worker shape how many fit)"
            )
    return None
