"""Small collective helpers over torch.distributed; rank 0 decides, everyone follows."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar, cast

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from trainers.config import TrainConfig

T = TypeVar("T")


def torchrun_backend(cuda_available: bool) -> str:
    """The backend of a group made before the config is known: NCCL for CUDA tensors where a GPU exists, gloo for
    CPU tensors (the config broadcast, object collectives) always."""
    return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"


def ensure_process_group(backend: str, timeout_s: float = 1800) -> None:
    """Join the default process group from the env (torchrun), unless the launcher already did (Ray)."""
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def broadcast_from_rank0(obj: T | None) -> T:
    """Rank 0's value of obj, on every rank (the others pass None)."""
    box: list[object] = [obj]
    dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])


def mean_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean of per-rank floats (float64, so the sum is exact enough to be reproducible)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).tolist()


def barrier(group: ProcessGroup | None = None) -> None:
    """Wait for every rank (of group, default: all)."""
    dist.barrier(group=group)


def gather_to_rank0(obj: T, group: ProcessGroup | None = None) -> list[T]:
    """Every rank's obj, in rank order, on rank 0 (others get an empty list)."""
    rank = dist.get_rank()
    gathered: list[T | None] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, gathered, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return cast("list[T]", gathered) if gathered is not None else []  # set on rank 0 only, every slot filled


def new_checkpoint_group() -> ProcessGroup:
    """Collective: a gloo group over all ranks for checkpoint traffic, apart from training collectives."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=1800))


def pick_device(local_rank: int) -> torch.device:
    """This worker's GPU when it has one, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def start_worker(local_rank: int, train: TrainConfig) -> torch.device:
    """This worker's device, once it has joined the process group and set torch up as train.* asks."""
    device = pick_device(local_rank)
    ensure_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout_s=max(train.step_timeout_s * 2, 600) if train.step_timeout_s else 1800,
    )
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    if train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device
