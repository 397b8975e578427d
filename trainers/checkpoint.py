"""CheckpointStore: sharded, checksummed checkpoints that are committed whole or not at all.

Layout under <run>/checkpoints/step_000120/:
    shards/              torch.distributed.checkpoint files, each rank writes its own
    extra/rank_00000.pt  per-rank RNG, data-stream cursor and schedule (weights_only-loadable)
    MANIFEST.json        written last by rank 0 after every rank finished: sizes and sha256 of each file

A step folder without a MANIFEST.json, or whose files do not match it, is not a checkpoint. Rank 0
decides which checkpoint to load and broadcasts the decision, so ranks never act on listings that differ.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from data_pipeline import storage
from trainers.distributed import barrier, broadcast_from_rank0

log = logging.getLogger("kiln.checkpoint")

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it."""


@dataclass(frozen=True)
class Committed:
    """A verified checkpoint."""

    step: int
    url: str
    manifest: dict


def step_dir(step: int) -> str:
    """Folder name of a step's checkpoint."""
    return f"step_{step:06d}"


def sha256_of(url: str) -> str:
    """sha256 of a file, streamed."""
    fs, path = storage.filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(url: str) -> dict:
    """The manifest of a committed checkpoint; CheckpointError if missing or any file does not match."""
    try:
        manifest = json.loads(storage.read_text(storage.join(url, MANIFEST)))
    except FileNotFoundError:
        raise CheckpointError(f"{url} has no {MANIFEST}: it was never committed") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{url}/{MANIFEST} is not valid JSON: {exc}") from None
    on_disk = dict(storage.walk_files(url))
    for entry in manifest["files"]:
        path = entry["path"]
        if path not in on_disk:
            raise CheckpointError(f"{url}: {path} listed in {MANIFEST} is missing")
        if on_disk[path] != entry["size"]:
            raise CheckpointError(f"{url}: {path} has {on_disk[path]} bytes, manifest says {entry['size']}")
        if sha256_of(storage.join(url, path)) != entry["sha256"]:
            raise CheckpointError(f"{url}: {path} does not match its sha256 in {MANIFEST}")
    return manifest


def capture_rng() -> dict:
    """Every RNG stream this process draws from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what capture_rng() returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointStore:
    """Saves and finds committed checkpoints of one run."""

    def __init__(self, root_url: str, *, rank: int, world_size: int, strategy: str, config_hash: str,
                 model_shapes: Optional[dict] = None):
        self.root = root_url
        self.model_shapes = model_shapes
        self.rank, self.world_size = rank, world_size
        self.strategy, self.config_hash = strategy, config_hash

    def url(self, step: int) -> str:
        """Where step's checkpoint lives."""
        return storage.join(self.root, step_dir(step))

    def save(self, step: int, strategy, extra: dict) -> str:
        """Collective: every rank writes its shards and extras; rank 0 commits the manifest last."""
        url = self.url(step)
        strategy.save(storage.join(url, "shards"))
        buffer = io.BytesIO()
        torch.save(extra, buffer)
        storage.write_atomic(storage.join(url, "extra", f"rank_{self.rank:05d}.pt"), buffer.getvalue())
        barrier()  # every rank's files are complete before the manifest can vouch for them
        if self.rank == 0:
            self._commit(url, step)
        barrier()
        return url

    def _commit(self, url: str, step: int) -> None:
        files = [{"path": rel, "size": size, "sha256": sha256_of(storage.join(url, rel))}
                 for rel, size in storage.walk_files(url) if rel != MANIFEST]
        manifest = {
            "format_version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
            "strategy": self.strategy, "config_hash": self.config_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files,
        }
        storage.write_atomic(storage.join(url, MANIFEST), json.dumps(manifest, indent=2))

    def steps_on_storage(self) -> list[int]:
        """Steps that have a folder, committed or not, newest first."""
        found = (STEP_DIR.match(name) for name in storage.list_names(self.root))
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def latest_committed(self) -> tuple[Optional[Committed], list[str]]:
        """The newest checkpoint that verifies, and why each newer one was skipped (run on one rank)."""
        skipped = []
        for step in self.steps_on_storage():
            url = self.url(step)
            if not storage.exists(storage.join(url, MANIFEST)):
                continue  # an uncommitted leftover of an interrupted save
            try:
                return Committed(step, url, verify(url)), skipped
            except CheckpointError as exc:
                skipped.append(str(exc))
                log.warning("skipping checkpoint: %s", exc)
        return None, skipped

    def restore(self, strategy) -> Optional[tuple[Committed, dict]]:
        """Collective: load the newest committed checkpoint into the strategy and return this rank's extras."""
        decision = self.latest_committed()[0] if self.rank == 0 else None
        decision = broadcast_from_rank0(decision)
        if decision is None:
            return None
        if decision.manifest.get("config_hash") != self.config_hash and self.model_shapes is not None:
            from trainers.export import check_fits, checkpoint_shapes

            shapes = checkpoint_shapes(storage.join(decision.url, "shards"), decision.manifest["strategy"])
            check_fits(self.model_shapes, shapes, decision.url)
        if decision.manifest["strategy"] != self.strategy:
            raise CheckpointError(f"{decision.url} was saved by strategy={decision.manifest['strategy']}; "
                                  f"resume it with that strategy (this run has strategy={self.strategy}), "
                                  "or export it with `kiln export`")
        saved_world = decision.manifest["world_size"]
        if saved_world != self.world_size:
            raise CheckpointError(f"{decision.url} was saved by {saved_world} workers but this run has "
                                  f"{self.world_size}; resume with cluster.num_workers={saved_world}")
        strategy.load(storage.join(decision.url, "shards"))
        raw = storage.read_bytes(storage.join(decision.url, "extra", f"rank_{self.rank:05d}.pt"))
        extra = torch.load(io.BytesIO(raw), weights_only=True)
        return decision, extra
