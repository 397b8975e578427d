"""A checkpoint folder's names and its MANIFEST.json, without torch: what the driver reads to list, show and
pick checkpoints (`kiln status`, the run's record) and what trainers/checkpoint/store.py writes.

<checkpoints>/step_000120/MANIFEST.json marks the step committed; see store.py for the whole layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from data_pipeline import storage
from trainers.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass(frozen=True)
class Committed:
    """A verified checkpoint."""

    step: int
    url: str
    manifest: dict


def step_dir(step: int) -> str:
    """Folder name of a step's checkpoint."""
    return f"step_{step:06d}"


def manifest_problem(manifest) -> str | None:
    """What makes a parsed MANIFEST.json unusable (wrong shape or types), or None if it is sound."""
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    for key, kind in (("step", int), ("world_size", int), ("strategy", str), ("files", list)):
        if key not in manifest:
            return f'it has no "{key}"'
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            return f'"{key}" is {json.dumps(manifest[key])[:40]}, not {"a list" if kind is list else kind.__name__}'
    if manifest["world_size"] < 1:
        return f'"world_size" is {manifest["world_size"]}'
    for number, entry in enumerate(manifest["files"]):
        problem = file_entry_problem(entry)
        if problem:
            return f"files[{number}] {problem}"
    return None


def file_entry_problem(entry) -> str | None:
    """What is wrong with one {"path", "size", "sha256"} entry of a manifest, or None."""
    if not isinstance(entry, dict):
        return "is not an object"
    path, size, digest = entry.get("path"), entry.get("size"), entry.get("sha256")
    # A path that leaves the checkpoint folder would be read, or copied to, somewhere else.
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
        return f'has no usable "path" ({json.dumps(path)[:60]})'
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f'({path}) has no usable "size"'
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        return f'({path}) has no usable "sha256"'
    return None


def read_manifest(url: str) -> dict:
    """A checkpoint's MANIFEST.json, parsed and shape-checked; CheckpointError if absent or unusable."""
    name = storage.join(url, MANIFEST)
    try:
        manifest = json.loads(storage.read_text(name))
    except FileNotFoundError:
        raise CheckpointError(f"{url} has no {MANIFEST}: it was never committed") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{name} is not valid JSON: {exc}") from None
    problem = manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{name} is damaged: {problem}")
    return manifest


def steps_on_storage(root_url: str) -> list[int]:
    """Steps under a checkpoints folder that have a folder, committed or not, newest first."""
    found = (STEP_DIR.match(name) for name in storage.list_names(root_url))
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def is_committed(url: str) -> bool:
    """Whether the step folder at url has its MANIFEST.json (cheap: no checksum pass)."""
    return storage.exists(storage.join(url, MANIFEST))
