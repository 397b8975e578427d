"""Opening a checkpoint never runs code: someone who can write the bucket plants a pickle payload in a
checkpoint file and rewrites MANIFEST.json to match; Kiln refuses the file, names it, runs nothing,
and restore falls back to the checkpoint before.

The same on object storage: tests/integration/test_checkpoint_safety_s3.py; for DeepSpeed's files
(DeepSpeed starts compiler processes): tests/integration/test_checkpoint_safety_deepspeed.py."""

from __future__ import annotations

import pickle

import pytest
from torch import nn

from tests.helpers import (
    REFUSED,
    Payload,
    assert_falls_back_to_step_1,
    plant,
    save_two,
    strategy,
    torch_bytes,
)
from trainers.checkpoint.store import CheckpointError, verify

pytestmark = pytest.mark.usefixtures("process_group")


def test_a_payload_in_dcp_metadata_is_refused_and_restore_falls_back(tmp_path):
    store, saved = save_two(tmp_path)
    marker = tmp_path / "pwned"
    step_2 = tmp_path / "checkpoints" / "step_000002"
    plant(step_2, "shards/.metadata", pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=rf"step_000002/shards/\.metadata {REFUSED} \(builtins\.exec\)"):
        verify(store.url(2))
    assert_falls_back_to_step_1(store, saved, "ddp", "shards/.metadata")
    # Export reads the shards directly: the same refusal, not a traceback and not the payload.
    from trainers.export import checkpoint_shapes, load_consolidated

    with pytest.raises(CheckpointError, match=REFUSED):
        checkpoint_shapes(str(step_2 / "shards"), "ddp")
    with pytest.raises(CheckpointError, match=REFUSED):
        load_consolidated(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), str(step_2 / "shards"), "ddp")
    assert not marker.exists()


def test_a_payload_in_a_dcp_non_tensor_item_is_refused_and_restore_falls_back(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from trainers.checkpoint.dcp_read import read_metadata
    from trainers.strategies.dcp_io import load_model_only

    store, saved = save_two(tmp_path)
    marker = tmp_path / "pwned"
    shards = tmp_path / "checkpoints" / "step_000002" / "shards"
    metadata = read_metadata(str(shards))
    # An optimizer option (saved with torch.save inside a .distcp file) now points at a payload.
    index = next(i for i in metadata.storage_data if i.fqn.endswith("param_groups.0.lr"))
    info = metadata.storage_data[index]
    distcp = shards / info.relative_path
    data, payload = distcp.read_bytes(), torch_bytes(Payload(marker))
    metadata.storage_data[index] = _StorageInfo(info.relative_path, len(data), len(payload))
    plant(shards.parent, f"shards/{info.relative_path}", data + payload)
    plant(shards.parent, "shards/.metadata", pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=rf"{info.relative_path} \(item optim\.param_groups\.0\.lr\) {REFUSED}"):
        verify(store.url(2))
    assert_falls_back_to_step_1(store, saved, "ddp", "optim.param_groups.0.lr")
    s = strategy()
    with pytest.raises(CheckpointError, match=REFUSED):
        s.load(str(shards), 1)
    load_model_only(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), str(shards))  # model items are tensors
    assert not marker.exists()


def test_a_payload_in_the_extras_is_refused_and_restore_falls_back(tmp_path):
    store, saved = save_two(tmp_path)
    marker = tmp_path / "pwned"
    plant(
        tmp_path / "checkpoints" / "step_000002",
        "extra/rank_00000.pt",
        torch_bytes({"step": 2, "rng": Payload(marker)}),
    )
    with pytest.raises(CheckpointError, match=rf"extra/rank_00000\.pt {REFUSED} \(exec\)"):
        verify(store.url(2))
    assert_falls_back_to_step_1(store, saved, "ddp", "extra/rank_00000.pt")
    assert not marker.exists()


def test_dcp_metadata_pointing_outside_its_folder_is_refused_and_restore_falls_back(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from trainers.checkpoint.dcp_read import read_metadata

    store, saved = save_two(tmp_path)
    shards = tmp_path / "checkpoints" / "step_000002" / "shards"
    metadata = read_metadata(str(shards))
    index = next(iter(metadata.storage_data))
    info = metadata.storage_data[index]
    metadata.storage_data[index] = _StorageInfo("../../../../etc/hostname", info.offset, info.length)
    plant(shards.parent, "shards/.metadata", pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=rf"{REFUSED} \(a shard path '\.\./\.\./\.\./\.\./etc/hostname'"):
        verify(store.url(2))
    assert_falls_back_to_step_1(store, saved, "ddp", "shards/.metadata")
