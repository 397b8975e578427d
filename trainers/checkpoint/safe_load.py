"""Every checkpoint file Kiln opens is read here, by loaders that build data and never run code.

A checkpoint lives in a bucket that others may be able to write, and its MANIFEST checksums do not
help (whoever rewrites a file can rewrite its checksum). So no checkpoint byte ever reaches plain
pickle: DCP's `.metadata` goes through an unpickler that knows only the DCP metadata classes, and every
torch file (Kiln's extras, DCP's non-tensor items, DeepSpeed's model and optimizer states, also inside
DeepSpeed's own readers) through torch's weights_only loader with the few DeepSpeed types allow-listed.
A file that needs anything else is refused with a CheckpointError naming it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pathlib
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, ClassVar

import torch

from trainers.errors import CheckpointError

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
DCP_METADATA = ".metadata"


class Refused(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


def refused_message(name: str, what: str) -> str:
    """The one line a refused checkpoint file gets."""
    return (
        f"{name} holds objects Kiln will not load ({what}); the checkpoint may have been tampered "
        "with: delete it or restore it from a copy you trust"
    )


def _dcp_metadata_globals() -> dict[tuple[str, str], Any]:
    """Exactly the globals a DCP .metadata file refers to: its dataclasses, sizes, dtypes and layouts."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {
        (metadata.__name__, name): getattr(metadata, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    # The checkpoint_id DCP records (the folder it was written to): a path object, inert.
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    allowed[("pathlib", "PurePosixPath")] = pathlib.PurePosixPath
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """pickle with find_class limited to the DCP metadata allow-list (and no persistent ids)."""

    allowed: ClassVar[dict[tuple[str, str], Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise Refused("a persistent id")


def read_dcp_metadata(stream: IO[bytes], name: str):
    """DCP's Metadata from a .metadata stream; CheckpointError naming `name` if refused or damaged."""
    from torch.distributed.checkpoint.metadata import Metadata

    if not _MetadataUnpickler.allowed:
        _MetadataUnpickler.allowed = _dcp_metadata_globals()
    try:
        metadata = _MetadataUnpickler(stream).load()
    except Refused as exc:
        raise CheckpointError(refused_message(name, str(exc))) from None
    except Exception as exc:  # truncated or garbage bytes: any of pickle's many error types
        raise CheckpointError(
            f"{name} is damaged ({type(exc).__name__}: {_first_line(exc)}); the checkpoint cannot be used"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            f"{name} is damaged (it holds a {type(metadata).__name__}, not DCP metadata); the checkpoint cannot be used"
        )
    for info in (metadata.storage_data or {}).values():
        # DCP joins relative_path onto the shards folder: '../x' or '/etc/x' would read any host file.
        path = getattr(info, "relative_path", "")
        if not isinstance(path, str) or not path or "/" in path or "\\" in path or path in (".", ".."):
            raise CheckpointError(refused_message(name, f"a shard path {path!r} outside its folder"))
    return metadata


def check_dcp_items(metadata, read_slice: Callable[[str, int, int], bytes], where: str) -> None:
    """Refuse a DCP checkpoint whose non-tensor items (saved with torch.save) would not load safely.

    read_slice(relative_path, offset, length) returns the bytes of one item from the shards folder.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        items = [
            (index.fqn, info)
            for index, info in metadata.storage_data.items()
            if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata)
        ]
    except (AttributeError, TypeError) as exc:  # well-formed classes holding the wrong fields
        raise CheckpointError(f"{where}/{DCP_METADATA} is damaged ({exc}); the checkpoint cannot be used") from None
    for fqn, info in items:
        name = f"{where}/{info.relative_path} (item {fqn})"
        try:
            raw = read_slice(info.relative_path, info.offset, info.length)
        except (OSError, ValueError, AttributeError, TypeError) as exc:  # FileNotFoundError included
            raise CheckpointError(f"{name} cannot be read ({exc}); the checkpoint cannot be used") from None
        load_torch(raw, name)


def deepspeed_globals() -> list:
    """The non-torch types DeepSpeed writes into its model and optimizer state files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_torch(
    source: str | IO[bytes] | bytes, name: str, map_location: MAP_LOCATION = "cpu", allow: Sequence = ()
) -> Any:
    """torch.load with weights_only=True (plus the `allow` types); CheckpointError naming `name`.

    Any, as torch.load's own: what the file holds (a tensor, a state dict, an optimizer state), which callers index.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with _allowed(allow):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(refused_message(name, _refused_what(str(exc)))) from None
    except Exception as exc:  # truncated zip, garbage: torch raises RuntimeError, EOFError, ...
        raise CheckpointError(
            f"{name} is damaged ({type(exc).__name__}: {_first_line(exc)}); the checkpoint cannot be used"
        ) from None


def check_torch_file(source: str | IO[bytes], path: str, name: str) -> None:
    """Refuse a checkpoint's torch file (path relative to the checkpoint) that would not load safely.

    Only its pickle is read: on the meta device torch builds empty tensors and skips their bytes.
    """
    # Among the shards only DeepSpeed writes .pt files; Kiln's own extras need no extra types.
    allow = deepspeed_globals() if path.startswith("shards/") else ()
    load_torch(source, name, map_location="meta", allow=allow)


@contextlib.contextmanager
def deepspeed_reads(where: str) -> Iterator[None]:
    """Inside: every torch.load (DeepSpeed's own, which ask for weights_only=False) is weights_only.

    DeepSpeed opens its files itself, in its engine, zero_to_fp32 and ds_to_universal; torch's switch
    forces those loads safe too, with DeepSpeed's few types allowed. A refusal names `where`.
    """
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with _allowed(deepspeed_globals()):
            yield
    except pickle.UnpicklingError as exc:
        raise CheckpointError(refused_message(f"a DeepSpeed file under {where}", _refused_what(str(exc)))) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def _allowed(types: Sequence) -> contextlib.AbstractContextManager:
    """torch's safe_globals for those of `types` not allowed already (its exit would drop an outer one's)."""
    present = set(torch.serialization.get_safe_globals())
    return torch.serialization.safe_globals([t for t in types if t not in present])


def _refused_what(message: str) -> str:
    """What torch's weights_only loader refused, out of its long multi-line message."""
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    if found:
        return found.group(1)
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", message)
    return detail.group(1)[:160] if detail else "objects outside the allowed types"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no detail"
