"""A payload planted in a checkpoint on object storage runs nothing: `kiln export` reads the shards
straight from the store and refuses it, and a restarted worker falls back to the checkpoint before.
The store is the session's moto server; the local-disk stories are in tests/unit/test_checkpoint_safety.py."""

from __future__ import annotations

import pickle
import uuid

import fsspec
import pytest
import torch
from torch import nn

from tests.helpers import REFUSED, Payload, assert_falls_back_to_step_1, plant, save_steps, strategy
from trainers.checkpoint.store import CheckpointError, CheckpointStore, verify

pytestmark = pytest.mark.usefixtures("process_group")


def test_on_object_storage_a_payload_is_refused_by_export_and_restore(s3, tmp_path):
    from trainers.export import checkpoint_shapes, load_consolidated

    root = f"s3://{s3}/safety-{uuid.uuid4().hex[:8]}/checkpoints"
    store = CheckpointStore(root, rank=0, world_size=1, strategy="ddp", config_hash="h")
    saved = save_steps(strategy(), store)
    marker = tmp_path / "pwned"
    local = tmp_path / "step_000002"
    fs = fsspec.filesystem("s3")
    fs.get(store.url(2), str(local), recursive=True)
    plant(local, "shards/.metadata", pickle.dumps(Payload(marker)))
    fs.put(str(local / "shards" / ".metadata"), f"{store.url(2)}/shards/.metadata")
    fs.put(str(local / "MANIFEST.json"), f"{store.url(2)}/MANIFEST.json")
    # What `kiln export` does: verify on the store (no local copy), then read the shards from it.
    with pytest.raises(CheckpointError, match=rf"step_000002/shards/\.metadata {REFUSED}"):
        verify(store.url(2))
    with pytest.raises(CheckpointError, match=REFUSED):
        checkpoint_shapes(f"{store.url(2)}/shards", "ddp")
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with pytest.raises(CheckpointError, match=REFUSED):
        load_consolidated(model, f"{store.url(2)}/shards", "ddp")
    load_consolidated(model, f"{store.url(1)}/shards", "ddp")
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[1][key]), key
    # What a restarted worker does: verify while downloading, load the local copy.
    assert_falls_back_to_step_1(store, saved, "ddp", "shards/.metadata")
    assert not marker.exists()
