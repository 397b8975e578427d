"""Where `kiln prepare` writes: a dataset is replaced whole or not at all, never half.

A local output is built in a staging folder beside it and swapped in with renames
(data_pipeline/staging.py). An object-store output, which has no rename, gets the new data under a
fresh `v-<fingerprint>/` prefix, then the root manifest.json that points at it (one PUT: the commit),
and only then loses the old files. A failure before the commit leaves every old file as it was; its
leftovers go next time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from typing import TypeVar

from data_pipeline import storage
from data_pipeline.dataset import MANIFEST, write_manifest
from data_pipeline.staging import replace_folder

T = TypeVar("T")
# What a prepared output may hold; anything else means output= points at someone else's folder.
DATASET_ENTRIES = {MANIFEST, "tokenizer", "train", "val", "label_map.json"}
VERSION = re.compile(r"v-[0-9a-f]{20}")  # an object-store output's data folder: v-<fingerprint>


def write_dataset(output: str, key: str, build: Callable[[str], tuple[T, dict]]) -> T:
    """Run build(folder) -> (summary, manifest body) where it cannot be seen, then commit it as output."""
    if storage.is_local(output):
        return replace_folder(storage.filesystem(output)[1], _committing(build), overwrite=True)
    return _replace_versioned(output, key, build)


def _committing(build: Callable[[str], tuple[T, dict]]) -> Callable[[str], T]:
    """build, then its manifest written into the same (staging) folder."""

    def run(folder: str) -> T:
        summary, manifest = build(folder)
        write_manifest(folder, manifest)
        return summary

    return run


def existing_manifest(output: str) -> dict | None:
    """The manifest of a dataset already at output; None if there is none (or it is unreadable)."""
    try:
        manifest = json.loads(storage.read_text(storage.join(output, MANIFEST)))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def replace_problem(output: str) -> str | None:
    """Why output may not be (re)written, or None: it holds something besides a prepared dataset."""
    if storage.is_local(output) and os.path.isfile(storage.filesystem(output)[1]):
        return f"output={output} is a file; give a folder (new, empty or a prepared dataset)"
    foreign = [
        name
        for name in storage.list_names(output)
        if name not in DATASET_ENTRIES and not VERSION.fullmatch(name) and not name.startswith(".tmp-")
    ]
    if foreign:
        return (
            f"output={output} holds files that are not part of a prepared dataset "
            f"({', '.join(foreign[:4])}); give a new or empty folder, or a prepared dataset to replace"
        )
    return None


def _replace_versioned(output: str, key: str, build: Callable[[str], tuple[T, dict]]) -> T:
    """Object stores: write under output/v-<key>, commit by writing the root manifest, then drop the old files."""
    version = f"v-{key}"
    current = _version_of(existing_manifest(output))
    for name in storage.list_names(output):  # an earlier prepare that crashed before its commit
        if VERSION.fullmatch(name) and name != current:
            storage.remove(storage.join(output, name), recursive=True)
    try:
        summary, manifest = build(storage.join(output, version))
    except BaseException:
        _remove_quietly(storage.join(output, version))
        raise
    write_manifest(output, _under(version, manifest))  # the commit: one PUT, whole or not at all
    for name in storage.list_names(output):
        if name not in (MANIFEST, version):
            storage.remove(storage.join(output, name), recursive=True)
    return summary


def _version_of(manifest: dict | None) -> str | None:
    """The v-<fingerprint> folder a root manifest points into (None: the files lie at the root)."""
    path = str(((manifest or {}).get("tokenizer") or {}).get("path", ""))
    first = path.split("/", 1)[0]
    return first if VERSION.fullmatch(first) else None


def _under(prefix: str, manifest: dict) -> dict:
    """manifest with every file path (tokenizer, shards, masks, labels) made relative to its parent folder."""

    def entry(item: dict) -> dict:
        moved = {**item, "path": f"{prefix}/{item['path']}"}
        for side in ("mask", "labels"):
            if isinstance(item.get(side), dict):
                moved[side] = {**item[side], "path": f"{prefix}/{item[side]['path']}"}
        return moved

    splits = {
        name: {**split, "shards": [entry(shard) for shard in split["shards"]]}
        for name, split in manifest["splits"].items()
    }
    return {**manifest, "splits": splits, "tokenizer": entry(manifest["tokenizer"])}


def _remove_quietly(url: str) -> None:
    """Best effort: a leftover that cannot be removed now is removed by the next prepare."""
    with contextlib.suppress(OSError):
        storage.remove(url, recursive=True)
