"""One way to reach storage, local or object store, through fsspec.

A URL is a local path or anything fsspec understands (`s3://bucket/key`, `memory://x`). Writes that
must never be seen half-done go through `write_atomic`: a local temp file renamed into place, or a
single object PUT (which object stores make visible whole or not at all).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Iterable

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for url and the path within it."""
    return url_to_fs(url)


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    return "://" not in url or url.startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or path with '/'."""
    if is_local(url) and "://" not in url:
        return os.path.join(url, *parts)
    return posixpath.join(url, *parts)


def exists(url: str) -> bool:
    """Whether a file or folder exists at url."""
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    """The whole content of a file."""
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    """A file's content as UTF-8 text."""
    return read_bytes(url).decode("utf-8")


def write_atomic(url: str, data: bytes | str) -> None:
    """Write a whole file so that readers see the old content or the new, never a torn one."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fs, path = filesystem(url)
    if is_local(url):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, payload)


def makedirs(url: str) -> None:
    """Create a folder (a no-op on object stores, which have no folders)."""
    fs, path = filesystem(url)
    if is_local(url):
        fs.makedirs(path, exist_ok=True)


def list_names(url: str) -> list[str]:
    """Names (not paths) directly under a folder; empty if it does not exist."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def walk_files(url: str) -> Iterable[tuple[str, int]]:
    """(relative path, size) of every file below a folder, sorted by path."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    for full, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        rel = posixpath.relpath(full, root) if not is_local(url) else os.path.relpath(full, root)
        yield rel, int(info["size"])


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file or folder; missing is fine."""
    fs, path = filesystem(url)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
