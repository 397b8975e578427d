"""CheckpointStore: sharded, checksummed checkpoints that are committed whole or not at all.

Layout under <run>/checkpoints/step_000120/:
    shards/              each rank's own files (DCP, or DeepSpeed's layout), written straight to the store
    extra/rank_00000.pt  per-rank RNG, data-stream cursor, schedule and loss scaler (weights_only-loadable)
    MANIFEST.json        written last by rank 0 once every rank confirmed its files: sizes and sha256

A step folder without a MANIFEST.json, or whose files do not match it, is not a checkpoint. Rank 0
decides which checkpoint to load and broadcasts the decision, so ranks never act on listings that differ.
With `checkpoint.async=true` the shards are written by a background thread while training goes on; at
most one save is in flight, and its manifest is committed only after every rank's upload finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from data_pipeline import storage
from trainers.checkpoint import safe_load
from trainers.checkpoint.layout import (
    FORMAT_VERSION,
    MANIFEST,
    Committed,
    read_manifest,
    step_dir,
    steps_on_storage,
)
from trainers.checkpoint.policy import choose_checkpoint, retention
from trainers.checkpoint.resharding import extras_rank, resharded_from
from trainers.checkpoint.restore_copy import RestoreCopy
from trainers.checkpoint.shapes import check_fits, checkpoint_shapes
from trainers.checkpoint.shards import ShardIO
from trainers.distributed import barrier, broadcast_from_rank0, gather_to_rank0, new_checkpoint_group
from trainers.errors import CheckpointError
from trainers.failpoints import failpoint

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

log = logging.getLogger("kiln.checkpoint")


@dataclass
class Restored:
    """What a restore loaded: the checkpoint, this rank's extras, and newer checkpoints it had to skip."""

    committed: Committed
    extra: dict
    skipped: list[str] = field(default_factory=list)
    resharded_from: int | None = None  # the saved world size, when it differs from this run's


def verify(url: str, copy: RestoreCopy | None = None) -> dict:
    """The manifest of a committed checkpoint; CheckpointError if missing or any file does not match.

    With a copy, every file is also written to the folder copy.place() gives while it is hashed, so a
    restore reads an object-store checkpoint once instead of once to verify and once to load. Files that
    are unpickled on load (DCP metadata, .pt files) are also read through the safe loaders, so one that
    matches a rewritten manifest but would not load safely fails here, and restore falls back.
    """
    manifest = read_manifest(url)
    on_disk = dict(storage.walk_files(url))
    for entry in manifest["files"]:
        path = entry["path"]
        if path not in on_disk:
            raise CheckpointError(f"{url}: {path} listed in {MANIFEST} is missing")
        if on_disk[path] != entry["size"]:
            raise CheckpointError(f"{url}: {path} has {on_disk[path]} bytes, manifest says {entry['size']}")
    copy_to = copy.place(manifest) if copy else None
    # 4 files at once, each in transfer.PART_CONCURRENCY parts: bounded memory, enough requests in flight
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="kiln-verify") as pool:
        digests = pool.map(
            lambda entry: storage.sha256_file(
                storage.join(url, entry["path"]),
                storage.join(copy_to, entry["path"]) if copy_to else None,
                size=entry["size"],
            ),
            manifest["files"],
        )
        for entry, digest in zip(manifest["files"], list(digests), strict=False):
            if digest != entry["sha256"]:
                raise CheckpointError(f"{url}: {entry['path']} does not match its sha256 in {MANIFEST}")
    check_pickles(url, manifest, copy_to)
    return manifest


def check_pickles(url: str, manifest: dict, copy_to: str | None) -> None:
    """CheckpointError unless every pickled part of a checkpoint (or of its copy) loads safely.

    That is DCP's .metadata and the non-tensor items it points to, Kiln's extras and DeepSpeed's .pt
    files: their checksums can be rewritten along with them, so they are read here the way restore
    and export will read them, by loaders that refuse anything but data.
    """

    def read(path: str, check):
        """check(handle, name) on the file at path (the copy if there is one), retried on store errors."""
        name = storage.join(url, path)
        fs, remote = storage.filesystem(storage.join(copy_to, path) if copy_to else name)

        def attempt():
            with fs.open(remote, "rb") as handle:
                return check(handle, name)

        return attempt() if copy_to else storage.retrying("read", name, attempt)

    paths = [entry["path"] for entry in manifest["files"]]
    for path in paths:
        if path.endswith(".pt"):
            read(path, lambda handle, name, path=path: safe_load.check_torch_file(handle, path, name))
    metadata_path = f"shards/{safe_load.DCP_METADATA}"
    if metadata_path in paths:
        metadata = read(metadata_path, safe_load.read_dcp_metadata)

        def read_slice(relative: str, offset: int, length: int) -> bytes:
            def item(handle, _name) -> bytes:
                handle.seek(offset)
                return handle.read(length)

            return read(f"shards/{relative}", item)

        safe_load.check_dcp_items(metadata, read_slice, storage.join(url, "shards"))


class CheckpointStore:
    """Saves, finds, restores and prunes the committed checkpoints of one run."""

    def __init__(
        self,
        root_url: str,
        *,
        rank: int,
        world_size: int,
        strategy: str,
        config_hash: str,
        mesh: dict[str, int] | None = None,
        model_shapes: dict | None = None,
        keep_last: int = 0,
        keep_every: int = 0,
        async_upload: bool = False,
    ):
        self.root = root_url
        self.model_shapes = model_shapes
        self.rank, self.world_size = rank, world_size
        self.strategy, self.config_hash = strategy, config_hash
        self.mesh = mesh  # FSDP2's (replicate, shard, tensor), recorded in each manifest
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_upload = async_upload
        # A gloo group of its own, so background uploads never race training collectives.
        self._group: ProcessGroup | None = None
        self._uploads: ThreadPoolExecutor | None = None
        self._pending: tuple[str, Future] | None = None

    def url(self, step: int) -> str:
        """Where step's checkpoint lives."""
        return storage.join(self.root, step_dir(step))

    def save(self, step: int, strategy: ShardIO, extra: dict) -> list[str]:
        """Collective: write step's checkpoint; returns the URLs committed during this call.

        Synchronous: this step's checkpoint, committed. Async: this call waits for the previous upload
        (returning its URL), captures this step's state and leaves its upload running.
        """
        committed = self.wait()
        url = self.url(step)
        if self.rank == 0 and storage.exists(url):
            storage.remove(url, recursive=True)  # an uncommitted leftover of a crashed attempt
        barrier()
        buffer = io.BytesIO()
        torch.save(extra, buffer)
        extra_name = f"extra/rank_{self.rank:05d}.pt"
        storage.write_atomic(storage.join(url, extra_name), buffer.getvalue())
        own = {extra_name: (buffer.getbuffer().nbytes, hashlib.sha256(buffer.getvalue()).hexdigest())}
        shards = storage.join(url, "shards")
        if not self.async_upload:
            records = strategy.save(shards)
            self._commit(url, step, {**own, **prefixed("shards", records)}, self._checkpoint_group())
            return [*committed, url]
        finish = strategy.save_async(shards, self._checkpoint_group())
        group = self._checkpoint_group()

        def upload() -> str:
            self._commit(url, step, {**own, **prefixed("shards", finish())}, group)
            return url

        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-ckpt-upload")
        self._pending = (url, self._uploads.submit(upload))
        return committed

    def wait(self) -> list[str]:
        """Block until the in-flight upload (if any) is committed; returns its URL. Re-raises its failure."""
        if self._pending is None:
            return []
        url, future = self._pending
        self._pending = None
        future.result()
        return [url]

    def close(self) -> None:
        """Stop the upload thread (call after wait())."""
        if self._uploads is not None:
            self._uploads.shutdown(wait=True)
            self._uploads = None

    def _checkpoint_group(self) -> ProcessGroup:
        if self._group is None:
            self._group = new_checkpoint_group()
        return self._group

    def _commit(self, url: str, step: int, own_files: dict, group) -> None:
        """Every rank hands rank 0 what it wrote; rank 0 writes MANIFEST.json last, then prunes."""
        everyone = gather_to_rank0(own_files, group)
        if self.rank == 0:
            written: dict = {}
            for files in everyone:
                written.update(files)
            on_store = dict(storage.walk_files(url))
            entries = []
            for rel, size in sorted(on_store.items()):
                if rel == MANIFEST:
                    continue
                recorded = written.get(rel)
                if recorded is not None and recorded[0] != size:
                    raise CheckpointError(
                        f"{storage.join(url, rel)} has {size} bytes on the store but "
                        f"{recorded[0]} were written; the upload was incomplete"
                    )
                digest = recorded[1] if recorded else storage.sha256_file(storage.join(url, rel))
                entries.append({"path": rel, "size": size, "sha256": digest})
            missing = sorted(set(written) - set(on_store))
            if missing:
                raise CheckpointError(f"{url}: {', '.join(missing)} written but not found on the store")
            manifest = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "world_size": self.world_size,
                "strategy": self.strategy,
                **({"mesh": self.mesh} if self.mesh else {}),
                "config_hash": self.config_hash,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": entries,
            }
            storage.write_atomic(storage.join(url, MANIFEST), json.dumps(manifest, indent=2))
            self.prune(keep=step)
        barrier(group)
        failpoint("checkpoint.committed", step=step, rank=self.rank)

    def prune(self, keep: int) -> list[int]:
        """Rank 0: delete uncommitted leftovers and committed checkpoints retention no longer keeps."""
        steps = self.steps_on_storage()
        committed = {s for s in steps if storage.exists(storage.join(self.url(s), MANIFEST))}
        _, removed = retention(steps, committed, keep_last=self.keep_last, keep_every=self.keep_every, pinned=keep)
        for s in removed:
            what = "committed checkpoint beyond checkpoint.keep_last" if s in committed else "uncommitted leftover"
            log.info("removing %s %s", what, self.url(s))
            storage.remove(self.url(s), recursive=True)
        return removed

    def steps_on_storage(self) -> list[int]:
        """Steps that have a folder, committed or not, newest first."""
        return steps_on_storage(self.root)

    def latest_committed(self, copy: RestoreCopy | None = None) -> tuple[Committed | None, list[str]]:
        """The newest checkpoint that verifies, and why each newer one was skipped (run on one rank).

        copy: receives the files of each checkpoint verified, and keeps those of the one chosen (see verify()).
        """
        manifests: dict[int, dict] = {}

        def verdicts():
            """(step, why it fails verification or None) of each committed step, newest first, verified lazily."""
            for step in self.steps_on_storage():
                url = self.url(step)
                if not storage.exists(storage.join(url, MANIFEST)):
                    continue  # an uncommitted leftover of an interrupted save
                try:
                    manifests[step] = verify(url, copy)
                except CheckpointError as exc:
                    log.warning("skipping checkpoint that fails verification: %s", exc)
                    yield step, str(exc)
                    continue
                yield step, None

        choice = choose_checkpoint(verdicts())
        if choice.step is None:
            return None, choice.skipped
        return Committed(choice.step, self.url(choice.step), manifests[choice.step]), choice.skipped

    def restore(self, strategy: ShardIO) -> Restored | None:
        """Collective: load the newest committed checkpoint into the strategy; this rank's extras."""
        # Rank 0 reads an object-store checkpoint once: verification copies it, the load reads the copy.
        copy = RestoreCopy(self.strategy) if self.rank == 0 and not storage.is_local(self.root) else None
        try:
            decision = self.latest_committed(copy) if self.rank == 0 else None
            committed, skipped = broadcast_from_rank0(decision)
            if committed is None:
                return None
            source = copy.url if copy and copy.url else committed.url
            self._check_compatible(committed, source)
            saved_world = committed.manifest["world_size"]
            strategy.load(storage.join(source, "shards"), saved_world)
            # On another world size: trainers/checkpoint/resharding.py says whose extras each rank takes.
            extra_url = storage.join(source, "extra", f"rank_{extras_rank(self.rank, saved_world):05d}.pt")
            extra = safe_load.load_torch(storage.read_bytes(extra_url), extra_url)
            return Restored(committed, extra, skipped, resharded_from(saved_world, self.world_size))
        finally:
            if copy:
                copy.remove()

    def _check_compatible(self, committed: Committed, source: str) -> None:
        if committed.manifest.get("config_hash") != self.config_hash and self.model_shapes is not None:
            shapes = checkpoint_shapes(storage.join(source, "shards"), committed.manifest["strategy"])
            check_fits(self.model_shapes, shapes, committed.url)
        if committed.manifest["strategy"] != self.strategy:
            raise CheckpointError(
                f"{committed.url} was saved by strategy={committed.manifest['strategy']}; "
                f"resume it with that strategy (this run has strategy={self.strategy}), "
                "or export it with `kiln export`"
            )


def prefixed(folder: str, records: dict) -> dict:
    """File records keyed by their path relative to the checkpoint folder."""
    return {f"{folder}/{name}": value for name, value in (records or {}).items()}
