"""Opening a checkpoint never runs code: someone who can write the bucket plants a pickle payload in a
checkpoint file and rewrites MANIFEST.json to match; Kiln refuses the file, names it, runs nothing,
and restore falls back to the checkpoint before."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.unit.checkpoint_helpers import save_two, strategy, train_one_step, weights
from trainers.checkpoint import CheckpointError, CheckpointStore, verify

pytestmark = pytest.mark.usefixtures("process_group")

REFUSED = "holds objects Kiln will not load"


class Payload:
    """What an attacker plants: unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(checkpoint: Path, rel: str, data: bytes) -> None:
    """Replace a checkpoint file and make MANIFEST.json agree, as an attacker with write access would."""
    (checkpoint / rel).write_bytes(data)
    manifest_path = checkpoint / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["path"] == rel:
            entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def assert_falls_back_to_step_1(store, saved, name: str, rel: str) -> None:
    fresh = strategy(name)
    restored = store.restore(fresh)
    assert restored.committed.step == 1 and restored.extra == {"step": 1}
    assert rel in restored.skipped[0] and REFUSED in restored.skipped[0]
    for key, value in weights(fresh).items():
        assert torch.equal(value, saved[1][key]), key


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

    from trainers.strategies.dcp_io import load_model_only, read_metadata

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


@pytest.fixture
def deepspeed_env(monkeypatch):
    """What a launcher sets for DeepSpeed, here for one process on the existing gloo group."""
    for key, value in {
        "LOCAL_RANK": "0",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("name", ["zero1", "zero3_offload"])
def test_deepspeed_checkpoint_round_trips_through_the_safe_loaders(tmp_path, deepspeed_env, name):
    store, saved = save_two(tmp_path, name)
    verify(store.url(2))
    fresh = strategy(name)
    restored = store.restore(fresh)
    assert restored.committed.step == 2 and restored.skipped == []
    for key, value in weights(fresh).items():
        assert torch.equal(value, saved[2][key]), key
    # On another world size the load goes through DeepSpeed's universal conversion, also under the guard.
    resharded = strategy(name)
    resharded.load(str(tmp_path / "checkpoints" / "step_000002" / "shards"), 2)
    for key, value in weights(resharded).items():
        assert torch.equal(value, saved[2][key]), key


@pytest.mark.parametrize("kind", ["model_states", "optim_states"])
def test_a_payload_in_a_deepspeed_file_is_refused_and_restore_falls_back(tmp_path, deepspeed_env, kind):
    from trainers.export import checkpoint_shapes, load_consolidated
    from trainers.safe_load import deepspeed_globals

    store, saved = save_two(tmp_path, "zero1")
    marker = tmp_path / "pwned"
    shards = tmp_path / "checkpoints" / "step_000002" / "shards"
    target = next((shards / "zero").glob(f"*{kind}.pt"))
    with torch.serialization.safe_globals(deepspeed_globals()):
        state = torch.load(target, weights_only=True)
    rel = f"shards/zero/{target.name}"
    plant(shards.parent, rel, torch_bytes({**state, "planted": Payload(marker)}))
    with pytest.raises(CheckpointError, match=rf"{target.name} {REFUSED} \(exec\)"):
        verify(store.url(2))
    assert_falls_back_to_step_1(store, saved, "zero1", rel)
    # DeepSpeed's own readers (engine, zero_to_fp32) are held to the same rule.
    with pytest.raises(CheckpointError, match=REFUSED):
        strategy("zero1").load(str(shards), 1)
    with pytest.raises(CheckpointError, match=REFUSED):
        load_consolidated(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), str(shards), "zero1")
    if kind == "model_states":
        with pytest.raises(CheckpointError, match=REFUSED):
            checkpoint_shapes(str(shards), "zero1")
    assert not marker.exists()


def test_on_object_storage_a_payload_is_refused_by_export_and_restore(s3, tmp_path):
    import uuid

    import fsspec

    from trainers.export import checkpoint_shapes, load_consolidated

    root = f"s3://{s3}/safety-{uuid.uuid4().hex[:8]}/checkpoints"
    s = strategy()
    store = CheckpointStore(root, rank=0, world_size=1, strategy="ddp", config_hash="h")
    saved = {}
    for step in (1, 2):
        train_one_step(s)
        store.save(step, s, {"step": step})
        saved[step] = weights(s)
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


def test_dcp_metadata_pointing_outside_its_folder_is_refused_and_restore_falls_back(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from trainers.strategies.dcp_io import read_metadata

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
