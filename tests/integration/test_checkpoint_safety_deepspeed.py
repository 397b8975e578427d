"""DeepSpeed's checkpoint files go through the same safe loaders: a ZeRO checkpoint round-trips (on this
world size and through the universal conversion), and a payload planted in one is refused, names the file,
runs nothing, and restore falls back to the checkpoint before. A restore from S3 loads from the copy it
verified, which DeepSpeed reads from a local folder.

Not a unit test: DeepSpeed's communication backend probes gcc and runs ninja to JIT-build its shared-memory
op when it starts, even on a one-process gloo group. The other formats: tests/unit/test_checkpoint_safety.py.
"""

from __future__ import annotations

import os
import uuid

import pytest
import torch
from torch import nn

from tests.helpers import (
    REFUSED,
    Payload,
    assert_falls_back_to_step_1,
    plant,
    restore_through_copy,
    save_two,
    strategy,
    torch_bytes,
    weights,
)
from trainers.checkpoint.store import CheckpointError, CheckpointStore, verify

pytestmark = pytest.mark.usefixtures("process_group")


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
    from trainers.checkpoint.safe_load import deepspeed_globals
    from trainers.export import checkpoint_shapes, load_consolidated

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


def test_a_deepspeed_restore_from_s3_loads_its_verified_copy_from_a_local_folder(s3, deepspeed_env, monkeypatch):
    """DeepSpeed opens files by path, so the bytes verification downloaded wait in a local folder, then go."""
    store = CheckpointStore(
        f"s3://{s3}/copies-{uuid.uuid4().hex[:8]}/checkpoints", rank=0, world_size=1, strategy="zero1", config_hash="h"
    )
    assert os.path.isabs(restore_through_copy(store, "zero1", monkeypatch))
