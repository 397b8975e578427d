"""Reading a DCP checkpoint (DDP, FSDP2) safely: DCP's readers, with .metadata through safe_load's unpickler.

A module of its own because it loads torch's distributed checkpointing: trainers/checkpoint/shapes.py
imports it only when it reads a checkpoint's shapes, and trainers/strategies/dcp_io.py loads through it.
"""

from __future__ import annotations

import os
from typing import IO, cast

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from data_pipeline import storage
from trainers.checkpoint import safe_load


class SafeMetadataReading(dcp.FileSystemReader):
    """Mixin for DCP's readers: .metadata through Kiln's restricted unpickler instead of plain pickle."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        """The checkpoint's Metadata; CheckpointError if it is damaged or holds anything but DCP metadata."""
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            # torch types the stream as IOBase; opened "rb", it is a binary file object
            metadata = safe_load.read_dcp_metadata(cast(IO[bytes], stream), os.fspath(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeFileSystemReader(SafeMetadataReading, dcp.FileSystemReader):
    """DCP's local reader, reading metadata safely."""


class SafeFsspecReader(SafeMetadataReading, FsspecReader):
    """DCP's fsspec (object store) reader, reading metadata safely."""


def reader(url: str):
    """A DCP storage reader for a local folder or an fsspec URL; it never unpickles freely."""
    return SafeFileSystemReader(url) if storage.is_local(url) else SafeFsspecReader(url)


def read_metadata(url: str) -> Metadata:
    """The DCP metadata of a shards folder, read safely."""
    return reader(url).read_metadata()
