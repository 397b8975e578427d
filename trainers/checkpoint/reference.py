"""task=dpo's reference artefact: the reference model's log-probs of every pair, committed like a checkpoint.

Layout under <run>/reference/ (trainers/run/folder.py REFERENCE_DIR):
    logps.safetensors   {"train": float32 (train pairs, 2), "val": float32 (val pairs, 2)}: each pair's summed answer
                        log-probs (chosen, rejected) by its index in its split (safetensors: no pickle)
    MANIFEST.json       written LAST by rank 0: a checkpoint manifest's shape (step 0, world size, strategy, files
                        with sizes and sha256), so trainers/checkpoint/store.py `verify` checks it unchanged, plus
                        what the tables were computed from (`data`) and how (`reference`)

Whether a run computes or reads them is `decide`'s call, on rank 0: no manifest, compute; a manifest whose files do
not verify, or that was made from other data, refuse in one line naming it (never recompute silently, with what
may be other weights); else read.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as load_tables
from safetensors.numpy import save as save_tables

from data_pipeline import storage
from trainers.checkpoint.layout import FORMAT_VERSION, MANIFEST
from trainers.checkpoint.store import verify
from trainers.errors import CheckpointError
from trainers.run.folder import REFERENCE_DIR

LOGPS_FILE = "logps.safetensors"
SPLITS = ("train", "val")
COLUMNS = ("chosen", "rejected")


class ReferenceError(CheckpointError):
    """A reference artefact a run cannot use; the message names it and says what to do."""


@dataclass(frozen=True)
class Decision:
    """What a run does about its reference log-probs: "compute", "read" (their file's sha256), or "refuse" (why)."""

    action: str
    detail: str = ""


def reference_url(run_url: str) -> str:
    """The run's reference folder."""
    return storage.join(run_url, REFERENCE_DIR)


def committed(url: str) -> bool:
    """Whether a reference folder has its MANIFEST.json (cheap: nothing verified)."""
    return storage.exists(storage.join(url, MANIFEST))


def damaged(url: str) -> str | None:
    """Why a committed reference artefact cannot be used (a file missing, resized or changed), or None if it verifies
    or was never committed: one line naming it."""
    if not committed(url):
        return None
    try:
        verify(url)
    except CheckpointError as exc:
        return (
            f"the reference log-probs of this task=dpo run at {url} are damaged ({exc}); Kiln does not compute them "
            "again under a run that may have trained since: restore the folder, or start a new run"
        )
    return None


def decide(url: str, data: dict) -> Decision:
    """Rank 0's decision for the reference folder at url, given the data the run trains on now (`data_facts`)."""
    if not committed(url):
        return Decision("compute")
    problem = damaged(url)
    if problem:
        return Decision("refuse", problem)
    manifest = json.loads(storage.read_text(storage.join(url, MANIFEST)))
    if manifest.get("data") != data:
        return Decision(
            "refuse",
            f"the reference log-probs at {url} were computed from other data ({manifest.get('data')}) than the run's "
            f"now ({data}): the dataset was prepared again under the run; train a new run on it",
        )
    (entry,) = [e for e in manifest["files"] if e["path"] == LOGPS_FILE]
    return Decision("read", entry["sha256"])


def encode(tables: dict[str, np.ndarray]) -> bytes:
    """The tables as logps.safetensors holds them (float32, (pairs, 2) a split)."""
    return save_tables({split: np.ascontiguousarray(tables[split], dtype=np.float32) for split in SPLITS})


def read(url: str, sha256: str, pairs: dict[str, int]) -> dict[str, np.ndarray]:
    """The committed tables, their bytes checked against the sha256 rank 0 verified and their shapes against the
    splits' pairs; ReferenceError naming the file otherwise."""
    name = storage.join(url, LOGPS_FILE)
    data = storage.read_bytes(name)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ReferenceError(f"{name} changed while the run read it; start the run again")
    tables = load_tables(data)
    for split in SPLITS:
        shape = tables[split].shape if split in tables else None
        if shape != (pairs[split], len(COLUMNS)):
            raise ReferenceError(f"{name} holds {split} log-probs of shape {shape}, not ({pairs[split]}, 2)")
    return tables


def commit(url: str, tables: dict[str, np.ndarray], *, world_size: int, strategy: str, data: dict, how: dict) -> str:
    """Rank 0: write the tables, then MANIFEST.json last (a leftover of an earlier try is removed first); returns the
    file's sha256."""
    if storage.exists(url):
        storage.remove(url, recursive=True)
    payload = encode(tables)
    storage.write_atomic(storage.join(url, LOGPS_FILE), payload)
    digest = hashlib.sha256(payload).hexdigest()
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": 0,
        "world_size": world_size,
        "strategy": strategy,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [{"path": LOGPS_FILE, "size": len(payload), "sha256": digest}],
        "columns": list(COLUMNS),
        "dtype": "float32",
        "reduction": "sum over answer tokens",
        "data": data,
        "reference": how,
    }
    storage.write_atomic(storage.join(url, MANIFEST), json.dumps(manifest, indent=2))
    return digest


def read_committed(url: str) -> dict[str, np.ndarray]:
    """The tables of a committed reference folder, verified (what `kiln eval RUN` scores a task=dpo run's val pairs
    against); ReferenceError in one line naming it when there is none or it is damaged."""
    if not committed(url):
        raise ReferenceError(f"{url} holds no committed reference log-probs: the run has not started training")
    problem = damaged(url)
    if problem:
        raise ReferenceError(problem)
    manifest = json.loads(storage.read_text(storage.join(url, MANIFEST)))
    (entry,) = [e for e in manifest["files"] if e["path"] == LOGPS_FILE]
    return read(url, entry["sha256"], manifest["data"]["pairs"])
