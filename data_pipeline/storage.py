"""One way to reach storage, local or object store, through fsspec.

A URL is a local path or anything fsspec understands (`s3://bucket/key`, `memory://x`). Writes that
must never be seen half-done go through `write_atomic`: a local temp file renamed into place, or a
single object PUT (which object stores make visible whole or not at all).

Every call here goes through `retrying` (data_pipeline/store_retry.py): transient object-store errors
are retried with backoff and logged; permanent ones raise `StorageError` naming the URL. A missing
file stays a FileNotFoundError.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import fsspec
from fsspec.core import url_to_fs

from data_pipeline import transfer
from data_pipeline.redaction import redact_text
from data_pipeline.s3_clients import configure_object_stores
from data_pipeline.store_retry import (
    StorageError,
    exception_chain,
    no_such_bucket,
    retry_attempts,
    retrying,
)

__all__ = ["StorageError", "retry_attempts", "retrying"]  # re-exported: callers reach retries through here

log = logging.getLogger("kiln.storage")
HASH_BLOCK_BYTES = 8 << 20  # read size when hashing a stream


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
    """Whether a file or folder exists at url (a missing bucket raises StorageError)."""
    fs, path = filesystem(url)
    if is_local(url):
        return retrying("check", url, fs.exists, path)
    try:
        # fs.info, not fs.exists: s3fs's exists says False for a missing bucket, hiding the real problem
        retrying("check", url, fs.info, path)
        return True
    except FileNotFoundError as exc:
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        if "s3" in protocols and "/" not in path.strip("/"):  # HeadBucket's bare 404: no such bucket
            raise no_such_bucket(url) from exc
        return False


def read_bytes(url: str) -> bytes:
    """The whole content of a file."""
    fs, path = filesystem(url)
    return retrying("read", url, fs.cat_file, path)


def read_text(url: str) -> str:
    """A file's content as UTF-8 text."""
    return read_bytes(url).decode("utf-8")


def sha256_stream(handle: IO[bytes], copy_to: IO[bytes] | None = None) -> str:
    """sha256 (hex) of a binary stream read to its end in blocks, each also written to copy_to if given."""
    digest = hashlib.sha256()
    # Blocks, not one read: checkpoint shards are gigabytes and must not be held in memory whole.
    for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
        digest.update(block)
        if copy_to is not None:
            copy_to.write(block)
    return digest.hexdigest()


def sha256_file(url: str, copy_to: str | None = None, size: int | None = None) -> str:
    """sha256 of a file, streamed (and copied to copy_to, a local path or e.g. a memory:// URL); retried
    whole on a store error. size, when known, saves asking the store for it.

    A copy from an object store is downloaded as parallel ranged reads, hashed as they arrive.
    """

    def digest_file() -> str:
        fs, path = filesystem(url)
        if copy_to and not is_local(url):
            length = fs.size(path) if size is None else size
            if is_local(copy_to):
                os.makedirs(os.path.dirname(copy_to), exist_ok=True)
                return transfer.download_hashed(fs, path, length, copy_to)
            data, digest = transfer.fetch_hashed(fs, path, length)
            target_fs, target = filesystem(copy_to)
            target_fs.pipe_file(target, data)
            return digest
        with fs.open(path, "rb") as handle, _open_copy(copy_to) as out:
            return sha256_stream(handle, out)

    # A retry starts over from the first byte (and rewrites copy_to), so no half-hashed state survives.
    return retrying("read", url, digest_file)


def _open_copy(url: str | None):
    """A binary write stream for a copy at url (a context manager), or a null context for no copy."""
    if not url:
        return contextlib.nullcontext()
    if is_local(url):
        os.makedirs(os.path.dirname(url), exist_ok=True)
        return open(url, "wb")
    return fsspec.open(url, "wb")


def write_atomic(url: str, data: bytes | str) -> None:
    """Write a whole file so that readers see the old content or the new, never a torn one."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fs, path = filesystem(url)
    if is_local(url):
        retrying("write", url, _write_local, path, payload)
    else:
        retrying("write", url, fs.pipe_file, path, payload)


def write_new(url: str, data: bytes | str) -> None:
    """Write a whole file that must not exist yet; FileExistsError if it does (two writers: one wins)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fs, path = filesystem(url)
    if is_local(url):
        retrying("create", url, _create_local, path, payload)
        return
    try:
        # If-None-Match: * makes the store itself refuse a second writer (AWS S3, MinIO, moto).
        retrying("create", url, fs.pipe_file, path, payload, mode="create")
    except OSError as exc:
        if any("PreconditionFailed" in str(e) or "412" in str(e) for e in exception_chain(exc)):
            raise FileExistsError(f"{redact_text(url)} already exists") from None
        raise


def _create_local(path: str, payload: bytes) -> None:
    tmp = _durable_temp(path, payload)
    try:
        os.link(tmp, path)  # atomic, and fails if path exists: whole content, one winner
    finally:
        os.unlink(tmp)


def _write_local(path: str, payload: bytes) -> None:
    tmp = _durable_temp(path, payload)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _durable_temp(path: str, payload: bytes) -> str:
    """payload in a synced temp file beside path (same file system, so a rename or link is atomic)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def makedirs(url: str) -> None:
    """Create a folder (a no-op on object stores, which have no folders)."""
    fs, path = filesystem(url)
    if is_local(url):
        retrying("mkdir", url, fs.makedirs, path, exist_ok=True)


def list_names(url: str) -> list[str]:
    """Names (not paths) directly under a folder; empty if it does not exist."""
    fs, path = filesystem(url)
    try:
        entries = retrying("list", url, fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def walk_files(url: str) -> Iterable[tuple[str, int]]:
    """(relative path, size) of every file below a folder, sorted by path."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    found = retrying("list", url, fs.find, root, detail=True)
    for full, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        rel = posixpath.relpath(full, root) if not is_local(url) else os.path.relpath(full, root)
        yield rel, int(info["size"])


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file or folder; missing is fine."""
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        retrying("remove", url, fs.rm, path, recursive=recursive)


@contextlib.contextmanager
def local_folder(url: str) -> Iterator[str]:
    """A local folder holding url's files: url itself when local, else a temporary copy (downloaded with retries)."""
    if is_local(url):
        os.makedirs(url, exist_ok=True)
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="kiln-copy-") as tmp:
        get_folder(url, tmp)
        yield tmp


def put_folder(local_dir: str, url: str, workers: int = 8) -> list[str]:
    """Upload every file below local_dir into folder url, each retried alone; returns relative paths."""
    rels = sorted(
        os.path.relpath(os.path.join(folder, name), local_dir).replace(os.sep, "/")
        for folder, _, names in os.walk(local_dir)
        for name in names
    )
    fs, root = filesystem(url)

    def upload(rel: str) -> None:
        target = _child(url, root, rel)
        if is_local(url):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        retrying("upload", join(url, rel), fs.put_file, os.path.join(local_dir, rel), target)

    _each(upload, rels, workers)
    return rels


def get_folder(url: str, local_dir: str, workers: int = 8) -> list[str]:
    """Download every file below folder url into local_dir, each retried alone; returns relative paths."""
    rels = [rel.replace(os.sep, "/") for rel, _ in walk_files(url)]
    if not rels and not exists(url):
        raise FileNotFoundError(f"{redact_text(url)}: no such folder")
    fs, root = filesystem(url)

    def download(rel: str) -> None:
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        retrying("download", join(url, rel), fs.get_file, _child(url, root, rel), target)

    _each(download, rels, workers)
    return rels


def _child(url: str, root: str, rel: str) -> str:
    """The filesystem path of rel below root (as `filesystem(url)` returned it)."""
    return os.path.join(root, *rel.split("/")) if is_local(url) else posixpath.join(root.rstrip("/"), rel)


def _each(fn: Callable[[str], None], items: list[str], workers: int) -> None:
    """fn on every item, a few at a time (store latency, not CPU, is the limit); first failure raises."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="kiln-storage")
    try:
        for _ in pool.map(fn, items):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


configure_object_stores()
