"""A checkpoint is committed whole or invisible; a damaged newest one falls back to the one before."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import save_two, store_at, strategy, train_one_step, weights
from trainers.checkpoint.store import CheckpointError, verify
from trainers.rng import capture_rng, restore_rng

pytestmark = pytest.mark.usefixtures("process_group")


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    store, _ = save_two(tmp_path)
    manifest = verify(store.url(2))
    assert manifest["step"] == 2 and manifest["strategy"] == "ddp" and manifest["world_size"] == 1
    for entry in manifest["files"]:
        assert (tmp_path / "checkpoints" / "step_000002" / entry["path"]).stat().st_size == entry["size"]
        assert len(entry["sha256"]) == 64


def test_uncommitted_leftover_is_ignored(tmp_path):
    store, _saved = save_two(tmp_path)
    leftover = tmp_path / "checkpoints" / "step_000003" / "shards"
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"half a checkpoint")
    committed, skipped = store.latest_committed()
    assert committed.step == 2 and skipped == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, damage):
    store, saved = save_two(tmp_path)
    shard = next((tmp_path / "checkpoints" / "step_000002" / "shards").glob("*.distcp"))
    data = shard.read_bytes()
    if damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.unlink()
    with pytest.raises(CheckpointError, match="step_000002"):
        verify(store.url(2))
    committed, skipped = store.latest_committed()
    assert committed.step == 1 and len(skipped) == 1
    fresh = strategy()
    restored = store.restore(fresh)
    assert restored.committed.step == 1 and restored.extra == {"step": 1}
    assert "step_000002" in restored.skipped[0]
    for key, value in weights(fresh).items():
        assert torch.equal(value, saved[1][key]), key


def test_a_checkpoint_from_more_workers_restores_resharded(tmp_path):
    store, saved = save_two(tmp_path)
    manifest_path = tmp_path / "checkpoints" / "step_000002" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["world_size"] = 4  # as if 4 workers had saved it; DCP reshards, rank 0's extras serve
    manifest_path.write_text(json.dumps(manifest))
    fresh = strategy()
    restored = store.restore(fresh)
    assert restored.committed.step == 2 and restored.resharded_from == 4
    for key, value in weights(fresh).items():
        assert torch.equal(value, saved[2][key]), key


def test_retention_keeps_the_newest_and_every_kth_and_clears_leftovers(tmp_path):
    s, store = strategy(), store_at(tmp_path, keep_last=2, keep_every=3)
    leftover = tmp_path / "checkpoints" / "step_000002" / "shards"  # a crashed save of an earlier attempt
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"half")
    for step in (1, 3, 4, 5, 6, 7):
        train_one_step(s)
        store.save(step, s, {"step": step})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003", "step_000006", "step_000007"]
    for step in (3, 6, 7):
        verify(store.url(step))


def test_async_save_captures_the_step_it_was_called_at(tmp_path):
    s, store = strategy(), store_at(tmp_path, async_upload=True)
    train_one_step(s)
    at_step_1 = weights(s)
    assert store.save(1, s, {"step": 1}) == []  # upload started, not yet committed
    train_one_step(s)  # training goes on while step 1 uploads
    assert store.save(2, s, {"step": 2}) == [store.url(1)]  # at most one in flight: step 1 done first
    assert store.wait() == [store.url(2)]
    assert store.wait() == []
    store.close()
    verify(store.url(1))
    (tmp_path / "checkpoints" / "step_000002" / "MANIFEST.json").unlink()
    fresh = strategy()
    restored = store.restore(fresh)
    assert restored.committed.step == 1
    for key, value in weights(fresh).items():
        assert torch.equal(value, at_step_1[key]), key


def test_rng_round_trip_is_exact():
    import random

    import numpy as np

    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(2).tolist(), random.random())
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand(2).tolist() == expected[1] and random.random() == expected[2]


def rewrite_manifest(tmp_path, change) -> None:
    """Damage step 2's MANIFEST.json: change(manifest) returns what is written back."""
    path = tmp_path / "checkpoints" / "step_000002" / "MANIFEST.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def entries(change):
    """A manifest change applied to its first file entry."""
    return lambda m: {**m, "files": [change(m["files"][0]), *m["files"][1:]]}


WRONG_SHAPES = {
    "a list": lambda m: [m],
    "no files": lambda m: without(m, "files"),
    "files not a list": lambda m: {**m, "files": {"path": "x"}},
    "entry not an object": entries(lambda e: e["path"]),
    "entry without path": entries(lambda e: without(e, "path")),
    "entry without size": entries(lambda e: without(e, "size")),
    "entry without sha256": entries(lambda e: without(e, "sha256")),
    "size a string": entries(lambda e: {**e, "size": str(e["size"])}),
    "sha256 a number": entries(lambda e: {**e, "sha256": 7}),
    "path outside the checkpoint": entries(lambda e: {**e, "path": "../step_000001/" + e["path"]}),
    "no world_size": lambda m: without(m, "world_size"),
    "world_size a string": lambda m: {**m, "world_size": "1"},
    "no strategy": lambda m: without(m, "strategy"),
}


@pytest.mark.parametrize("damage", WRONG_SHAPES)
def test_a_manifest_of_the_wrong_shape_falls_back_to_previous(tmp_path, damage):
    store, saved = save_two(tmp_path)
    rewrite_manifest(tmp_path, WRONG_SHAPES[damage])
    with pytest.raises(CheckpointError, match=r"step_000002/MANIFEST\.json is damaged: "):
        verify(store.url(2))
    assert_restores_step_1(store, saved, skipped_because="MANIFEST.json is damaged")


def test_an_unparsable_manifest_falls_back_to_previous(tmp_path):
    store, _ = save_two(tmp_path)
    (tmp_path / "checkpoints" / "step_000002" / "MANIFEST.json").write_bytes(b'{"files": [\xff')
    restored = store.restore(strategy())
    assert restored.committed.step == 1 and "MANIFEST.json is not valid JSON" in restored.skipped[0]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not metadata"])
def test_damaged_dcp_metadata_matching_its_manifest_falls_back_to_previous(tmp_path, damage):
    import hashlib
    import pickle

    store, saved = save_two(tmp_path)
    metadata = tmp_path / "checkpoints" / "step_000002" / "shards" / ".metadata"
    data = metadata.read_bytes()
    data = {
        "truncated": data[: len(data) // 2],
        "garbage": bytes(range(256)) * 4,
        "not metadata": pickle.dumps({"state_dict_metadata": {}}),
    }[damage]
    metadata.write_bytes(data)
    # The manifest agrees with the damaged file (rewritten too), so only reading the metadata tells.
    rewrite_manifest(
        tmp_path,
        lambda m: {
            **m,
            "files": [
                {**e, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                if e["path"] == "shards/.metadata"
                else e
                for e in m["files"]
            ],
        },
    )
    with pytest.raises(CheckpointError, match=r"step_000002/shards/\.metadata is damaged"):
        verify(store.url(2))
    assert_restores_step_1(store, saved, skipped_because=".metadata is damaged")


def assert_restores_step_1(store, saved, skipped_because: str) -> None:
    """A fresh strategy restores step 1's weights, the newer checkpoint skipped for the reason given."""
    fresh = strategy()
    restored = store.restore(fresh)
    assert restored.committed.step == 1 and skipped_because in restored.skipped[0]
    for key, value in weights(fresh).items():
        assert torch.equal(value, saved[1][key]), key


def test_manifest_problem_names_what_is_wrong():
    from trainers.checkpoint.layout import manifest_problem

    good = {"step": 2, "world_size": 1, "strategy": "ddp", "files": [{"path": "a", "size": 1, "sha256": "0" * 64}]}
    assert manifest_problem(good) is None
    assert manifest_problem([]) == "it holds a JSON list, not an object"
    assert manifest_problem(without(good, "files")) == 'it has no "files"'
    assert manifest_problem({**good, "world_size": True}) == '"world_size" is true, not int'
    assert manifest_problem({**good, "files": [{"path": "a", "size": 1}]}) == 'files[0] (a) has no usable "sha256"'


def test_a_restore_keeps_its_verified_copy_in_memory_only_where_dcp_loads_and_it_fits():
    from trainers.checkpoint.restore_copy import MEMORY_SHARE, keeps_in_memory

    free = 64 << 30
    fits = int(MEMORY_SHARE * free)
    assert keeps_in_memory("ddp", fits, free) and keeps_in_memory("fsdp", 1, free)
    assert not keeps_in_memory("fsdp", fits + 1, free)  # the model and its optimizer need the rest
    for name in ("zero1", "zero2", "zero3", "zero3_offload"):  # DeepSpeed opens files by path
        assert not keeps_in_memory(name, 1, free)


def test_a_verified_copy_in_memory_disappears_when_removed(tmp_path):
    import fsspec

    from trainers.checkpoint.restore_copy import RestoreCopy

    store, _ = save_two(tmp_path)
    copy = RestoreCopy("ddp")
    manifest = verify(store.url(2))
    url = copy.place(manifest)
    fsspec.filesystem("memory").pipe_file(url.removeprefix("memory://") + "/extra/x", b"1")
    copy.place(manifest)  # a second checkpoint verified: the first copy goes
    assert copy.url != url and not fsspec.filesystem("memory").exists(url)
    copy.remove()
    copy.remove()
    assert copy.url is None and not [path for path in fsspec.filesystem("memory").store if "kiln-restore-" in path]
