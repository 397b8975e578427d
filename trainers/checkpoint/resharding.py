"""Continuing a run on a different number of workers: every piece of resharding, in one place.

- Model and optimizer shards: DCP (DDP, FSDP2) reshards by itself on load (trainers/strategies/dcp_io.py).
  DeepSpeed ZeRO converts the checkpoint to its world-size-independent universal form, then loads that
  (`universal_checkpoint`), and two slips of its ZeRO-3 universal load are repaired afterwards.
- Per-rank extras (schedule, data cursor, RNG): the schedule and the global data cursor are the same on
  every rank, so rank r reads rank r's extras when it existed, else rank 0's (`extras_rank`); RNG
  streams belong to ranks that no longer exist, so each rank derives fresh ones from the seed, its rank
  and the step (trainers/rng.py `rank_seed`, applied by trainers/checkpoint/schedule.py).
- The run's events record `resharded_from` (the saved world size), which `kiln status` shows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import torch

from data_pipeline import storage
from trainers.checkpoint import safe_load

CONVERTED = "CONVERTED"  # written last into a universal checkpoint's folder: the conversion finished


def resharded_from(saved_world_size: int, world_size: int) -> int | None:
    """The saved world size when it differs from this run's (a resharded restore), else None."""
    return saved_world_size if saved_world_size != world_size else None


def extras_rank(rank: int, saved_world_size: int) -> int:
    """Whose per-rank extras rank `rank` restores: its own when that rank was saved, else rank 0's."""
    return rank if rank < saved_world_size else 0


def convert_to_universal(checkpoint_dir: str, output_dir: str) -> None:
    """Write DeepSpeed's world-size-independent (universal) form of the ZeRO checkpoint in checkpoint_dir."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=checkpoint_dir,
        output_folder=output_dir,
        # In-process and serial: worker pools would fork a process that holds the process group.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # Only Megatron-DeepSpeed records UNIVERSAL_CHECKPOINT_INFO (its TP/PP patterns); ZeRO-1/2
        # conversion refuses without it, and plain data parallelism needs none of those patterns.
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # progress chatter, one line per phase
        ds_to_universal.main(args)


@contextlib.contextmanager
def universal_checkpoint(shards_url: str, tag: str) -> Iterator[str]:
    """Collective: a local folder holding shards_url's checkpoint `tag` in universal form, under the same tag.

    The first rank of each host converts into a folder under the host's temp dir that the host's other
    ranks share (one conversion per machine, not per rank: it holds three fp32 copies of the model). A
    rank that cannot see its host's folder (same host name, separate file systems) converts on its own.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    identities: list[Any] = [None] * dist.get_world_size()  # all_gather_object fills in (host, uuid) pairs
    dist.all_gather_object(identities, (socket.gethostname(), uuid.uuid4().hex))
    hosts = [host for host, _ in identities]
    name = f"kiln-ds-universal-{identities[0][1]}"  # rank 0's, so a host's ranks agree on the folder
    shared = os.path.join(tempfile.gettempdir(), name)
    own = os.path.join(tempfile.gettempdir(), f"{name}-rank{rank}")
    converts = hosts.index(hosts[rank]) == rank
    owned = [shared] if converts else []
    try:
        collective_attempt(lambda: _convert_url(shards_url, shared, tag), run=converts)
        folder = shared
        if not os.path.exists(os.path.join(shared, CONVERTED)):
            folder = own
            owned.append(own)
        collective_attempt(lambda: _convert_url(shards_url, own, tag), run=folder == own)
        yield folder
        dist.barrier()  # the host's other ranks are done reading the shared folder
    finally:
        for path in owned:
            shutil.rmtree(path, ignore_errors=True)


def _convert_url(shards_url: str, folder: str, tag: str) -> None:
    """Convert shards_url's checkpoint `tag` into folder/tag, then mark folder complete."""
    os.makedirs(folder, exist_ok=True)
    with storage.local_folder(shards_url) as source, safe_load.deepspeed_reads(shards_url):
        convert_to_universal(os.path.join(source, tag), os.path.join(folder, tag))
    with open(os.path.join(folder, CONVERTED), "w"):
        pass


def collective_attempt(work, *, run: bool) -> None:
    """Collective: run work() where run is true; if it failed on any rank, raise on every rank."""
    import torch.distributed as dist

    error = None
    if run:
        try:
            work()
        except Exception as exc:  # re-raised below, after the other ranks have heard of it
            error = exc
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        # Failing here instead of in the next collective, where the other ranks would wait forever.
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} failed to convert a checkpoint to universal form: {message}")


def repair_zero3_universal_load(zero_optimizer, universal_dir: str) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load: shared step counters, group 0's options."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    # It hands one `step` tensor to every param group's state, and torch's Adam increments it in
    # place, so each step would advance it once per group and skew every later bias correction.
    for state in zero_optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    # It copies param group 0's options onto every group, which would give the undecayed group
    # (biases, norms) the decayed group's weight_decay.
    path = os.path.join(universal_dir, "zero", "optimizer_state.pt")
    universal = safe_load.load_torch(path, path, allow=safe_load.deepspeed_globals())
    saved = universal[OPTIMIZER_STATE_DICT][PARAM_GROUPS]
    groups = zero_optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise ValueError(f"checkpoint has {len(saved)} optimizer param groups, the model has {len(groups)}")
    for group, options in zip(groups, saved, strict=False):
        group.update({key: value for key, value in options.items() if key != "params"})
