"""Model + optimizer shards through torch.distributed.checkpoint, for DDP and FSDP2 alike.

DCP writes each rank's own shards and reads them back resharded to whatever the current world size
and sharding are, so the same files serve a resume on another number of workers and a one-process
export.
"""

from __future__ import annotations

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from data_pipeline import storage


def writer(url: str):
    """A DCP storage writer for a local folder or an fsspec URL."""
    if storage.is_local(url):
        return dcp.FileSystemWriter(url)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    return FsspecWriter(url)


def reader(url: str):
    """A DCP storage reader for a local folder or an fsspec URL."""
    if storage.is_local(url):
        return dcp.FileSystemReader(url)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    return FsspecReader(url)


def save_dcp(model: nn.Module, optimizer, url: str) -> None:
    """Collective: save model and optimizer state (FQN keys, no wrapper prefixes)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    storage.makedirs(url)
    dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer(url))


def load_dcp(model: nn.Module, optimizer, url: str) -> None:
    """Collective: load what save_dcp wrote into model and optimizer, resharding as needed."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=reader(url))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_model_only(model: nn.Module, url: str) -> None:
    """One process, no process group: fill a plain model from a DCP checkpoint of any world size."""
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=reader(url))
    model.load_state_dict(state["model"])
