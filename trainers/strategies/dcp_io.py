"""Model + optimizer shards through torch.distributed.checkpoint, for DDP and FSDP2 alike.

DCP writes each rank's own shards and reads them back resharded to whatever the current world size
and sharding are, so the same files serve a resume on another number of workers and a one-process
export. Every file a rank writes is hashed on its way out, so committing a checkpoint never has to
read it back from the store; reads go through trainers/checkpoint/dcp_read.py's safe readers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, cast

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from data_pipeline import storage, transfer
from trainers.checkpoint import safe_load
from trainers.checkpoint.dcp_read import reader
from trainers.checkpoint.shards import FileRecords
from trainers.errors import CheckpointError

UPLOAD_THREADS = 4


class HashingStream:
    """A write stream that counts and hashes bytes as DCP writes them."""

    def __init__(self, inner):
        self._inner, self._digest, self.size = inner, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self.size += view.nbytes
        return self._inner.write(data)

    def hexdigest(self) -> str:
        """sha256 of everything written so far."""
        return self._digest.hexdigest()

    def __getattr__(self, name):
        return getattr(self._inner, name)


class HashingFileSystem:
    """Wraps a DCP writer's file system to record (size, sha256) of every file it creates."""

    def __init__(self, inner):
        self._inner, self.records, self._lock = inner, {}, threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator:
        with self._open(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = HashingStream(stream)
            yield hashing
        # DCP writes .metadata as a .tmp file and renames it; record it under its final name.
        name = os.path.basename(os.fspath(path)).removesuffix(".tmp")
        with self._lock:
            self.records[name] = (hashing.size, hashing.hexdigest())

    def _open(self, path, mode: str):
        """The stream DCP writes a file through: on S3, one that uploads parts while DCP serialises."""
        fs = getattr(self._inner, "fs", None)
        protocols = getattr(fs, "protocol", ())
        if "w" in mode and "s3" in (protocols if isinstance(protocols, (tuple, list)) else (protocols,)):
            return transfer.S3PartWriter(fs, os.fspath(path))
        return self._inner.create_stream(path, mode)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def writer(url: str):
    """A DCP storage writer for a local folder or an fsspec URL, hashing what it writes."""
    if storage.is_local(url):
        made = dcp.FileSystemWriter(url)
    else:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        # Several files per rank, uploaded by parallel threads: one stream per rank leaves most of an
        # object store's bandwidth unused.
        # sync_files=False: an object has no fsync, and DCP's fallback, os.sync(), flushes every disk of the machine.
        made = FsspecWriter(url, thread_count=UPLOAD_THREADS, sync_files=False)
    # a duck-typed stand-in: HashingFileSystem forwards all but create_stream to the file system it wraps
    made.fs = cast(FileSystem, HashingFileSystem(made.fs))
    return made


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that non-tensor items (optimizer options) load weights_only, not by pickle."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        loaded = safe_load.load_torch(value, f"{self.url}: the saved value of {fqn}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


@contextlib.contextmanager
def refusals_unwrapped() -> Iterator[None]:
    """Let a CheckpointError out of DCP, which wraps what any rank raised into one multi-line exception."""
    try:
        yield
    except CheckpointException as exc:
        for failure in exc.failures.values():
            if isinstance(failure[0], CheckpointError):
                raise failure[0] from None
        raise


def frozen_names(model: nn.Module) -> set[str]:
    """Names of the parameters that never train (a LoRA base): checkpoints leave them out, as they come from
    the run's model.init_from copy."""
    return {name for name, param in model.named_parameters(remove_duplicate=False) if not param.requires_grad}


def state_options(model: nn.Module) -> StateDictOptions:
    """The model and optimizer state to save and load: without frozen parameters, whose values never change."""
    frozen = any(not param.requires_grad for param in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def save_dcp(model: nn.Module, optimizer, url: str) -> FileRecords:
    """Collective: save model and optimizer state (FQN keys, no wrapper prefixes); returns what this rank wrote."""
    model_state, optim_state = get_state_dict(model, optimizer, options=state_options(model))
    storage.makedirs(url)
    out = writer(url)
    dcp.save({"model": model_state, "optim": optim_state}, storage_writer=out)
    return dict(out.fs.records)


def save_dcp_async(model: nn.Module, optimizer, url: str, group: dist.ProcessGroup | None) -> Callable[[], FileRecords]:
    """Collective: copy the state to CPU now and write it in the background; returns a blocking finish()."""
    model_state, optim_state = get_state_dict(model, optimizer, options=state_options(model))
    storage.makedirs(url)
    out = writer(url)
    saving = dcp.async_save({"model": model_state, "optim": optim_state}, storage_writer=out, process_group=group)
    # a plain Future without an async stager (none is passed); else the AsyncSaveResponse's upload future
    future: Future = saving if isinstance(saving, Future) else saving.upload_completion

    def finish() -> FileRecords:
        future.result()
        return dict(out.fs.records)

    return finish


def load_dcp(model: nn.Module, optimizer, url: str) -> None:
    """Collective: load what save_dcp wrote into model and optimizer, resharding as needed."""
    options = state_options(model)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    with refusals_unwrapped():
        dcp.load(state, storage_reader=reader(url), planner=SafeLoadPlanner(url))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


def load_model_only(model: nn.Module, url: str) -> None:
    """One process, no process group: fill a plain model from a DCP checkpoint of any world size (frozen
    parameters, which such a checkpoint leaves out, keep the values the model was built with)."""
    frozen = frozen_names(model)
    state = {"model": {k: v for k, v in model.state_dict().items() if k not in frozen}}
    with refusals_unwrapped():  # no_dist: a driver that is also torchrun's rank 0 has a group; this read is its own
        dcp.load(state, storage_reader=reader(url), planner=SafeLoadPlanner(url), no_dist=True)
    model.load_state_dict(state["model"], strict=not frozen)
