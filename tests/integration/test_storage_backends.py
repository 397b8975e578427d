"""One storage contract, every backend: each test runs on local disk, on `memory://` and on the
session's moto S3 server, as runs do (a run's folder is a path or a URL; nothing else changes).

What data_pipeline/storage.py promises: whole-file writes readers never see torn, a create that only
one writer wins, listings by name and by walk, missing files that stay FileNotFoundError, folder
transfers; and on top of it, a run id claimed once and a checkpoint that restores exactly.
"""

from __future__ import annotations

import contextlib
import uuid

import fsspec
import pytest
import torch

from data_pipeline import storage
from data_pipeline.storage import StorageError
from orchestrator.run.registry import RunExists, RunRecord, RunRegistry
from tests.helpers import restore_through_copy, save_steps, strategy, weights
from trainers.checkpoint.store import CheckpointStore, verify


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path):
    """A fresh, empty folder on the backend: a path, memory://… or s3://kiln-test/…."""
    name = f"backends-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        yield str(tmp_path / name)
    elif request.param == "memory":
        yield f"memory://{name}"
        with contextlib.suppress(FileNotFoundError):  # one memory store serves the whole process
            fsspec.filesystem("memory").rm(f"/{name}", recursive=True)
    else:
        yield f"s3://{request.getfixturevalue('s3')}/{name}"


def test_a_written_file_reads_back_whole_and_a_rewrite_replaces_it(root):
    url = storage.join(root, "runs", "r1", "run.json")  # no folder made first: writes make their own
    storage.write_atomic(url, '{"state": "RUNNING"}')
    assert storage.read_text(url) == '{"state": "RUNNING"}' and storage.exists(url)
    storage.write_atomic(url, b'{"state": "SUCCEEDED"}')
    assert storage.read_bytes(url) == b'{"state": "SUCCEEDED"}'
    assert [name for name, _ in storage.walk_files(storage.join(root, "runs"))] == ["r1/run.json"]  # no temp left


def test_write_new_lets_only_the_first_writer_create_a_file(root):
    url = storage.join(root, "claims", "run.json")
    storage.write_new(url, "first")
    with pytest.raises(FileExistsError):
        storage.write_new(url, "second")
    assert storage.read_text(url) == "first"


def test_a_run_id_is_claimed_once(root):
    registry = RunRegistry(storage.join(root, "claims"))
    registry.create(RunRecord(run_id="r1"), "config: 1\n")
    # A second driver that raced past the listing still loses: the store refuses the second run.json.
    with pytest.raises(FileExistsError):
        storage.write_new(storage.join(root, "claims", "r1", "run.json"), "{}")
    with pytest.raises(RunExists, match="run 'r1' already exists"):
        registry.create(RunRecord(run_id="r1"), "config: 2\n")
    assert storage.read_text(storage.join(root, "claims", "r1", "config.yaml")) == "config: 1\n"


def test_listing_gives_names_below_a_folder_and_walking_gives_every_file(root):
    files = {"b/x.txt": b"12", "a/y.txt": b"345", "a/deep/z.bin": b"6789", "top.json": b"{}"}
    for rel, data in files.items():
        storage.write_atomic(storage.join(root, *rel.split("/")), data)
    assert storage.list_names(root) == ["a", "b", "top.json"]
    assert storage.list_names(storage.join(root, "a")) == ["deep", "y.txt"]
    assert list(storage.walk_files(root)) == sorted((rel, len(data)) for rel, data in files.items())


def test_join_puts_parts_below_the_root(root):
    assert storage.join(root, "runs", "r1", "metrics.jsonl") == f"{root}/runs/r1/metrics.jsonl"


def test_a_missing_file_is_file_not_found_not_a_storage_error(root, tmp_path):
    missing = storage.join(root, "nothing.json")
    with pytest.raises(FileNotFoundError) as raised:
        storage.read_bytes(missing)
    assert not isinstance(raised.value, StorageError)
    assert storage.exists(missing) is False
    assert storage.list_names(storage.join(root, "nothing")) == []
    assert list(storage.walk_files(storage.join(root, "nothing"))) == []
    storage.remove(missing)  # removing what is not there is fine
    with pytest.raises(FileNotFoundError):
        storage.get_folder(storage.join(root, "nothing"), str(tmp_path / "into"))


def test_remove_deletes_a_file_or_a_whole_folder(root):
    for rel in ("keep.txt", "ckpt/a.bin", "ckpt/shards/b.bin"):
        storage.write_atomic(storage.join(root, *rel.split("/")), b"x")
    storage.remove(storage.join(root, "keep.txt"))
    assert not storage.exists(storage.join(root, "keep.txt"))
    storage.remove(storage.join(root, "ckpt"), recursive=True)
    assert list(storage.walk_files(root)) == []
    assert not storage.exists(storage.join(root, "ckpt", "a.bin"))


def test_a_folder_uploads_and_downloads_file_for_file(root, tmp_path):
    local = tmp_path / "ckpt"
    files = {f"shards/rank_{i}/part_{j}.bin": bytes([i, j]) * (100 + i + j) for i in range(3) for j in range(2)}
    files["MANIFEST.json"] = b"{}"
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    url = storage.join(root, "checkpoints", "step_000001")
    assert storage.put_folder(str(local), url) == sorted(files)
    back = tmp_path / "back"
    assert storage.get_folder(url, str(back)) == sorted(files)
    assert {rel: (back / rel).read_bytes() for rel in files} == files


@pytest.mark.usefixtures("process_group")
def test_a_checkpoint_verifies_and_restores_exactly(root):
    store = CheckpointStore(storage.join(root, "checkpoints"), rank=0, world_size=1, strategy="ddp", config_hash="h")
    saved = save_steps(strategy(), store)
    assert sorted(store.steps_on_storage()) == [1, 2]
    assert verify(store.url(2))["step"] == 2
    fresh = strategy()
    restored = store.restore(fresh)
    assert restored.committed.step == 2 and restored.extra == {"step": 2} and restored.skipped == []
    for key, value in weights(fresh).items():
        assert torch.equal(value, saved[2][key]), key


@pytest.mark.usefixtures("process_group")
def test_a_restore_from_s3_loads_the_copy_it_verified_from_memory_and_keeps_no_copy(s3, monkeypatch):
    """Verifying downloads every file; DCP's load then reads those very bytes from memory, not the store."""
    store = CheckpointStore(
        f"s3://{s3}/copies-{uuid.uuid4().hex[:8]}/checkpoints", rank=0, world_size=1, strategy="ddp", config_hash="h"
    )
    loaded_from = restore_through_copy(store, "ddp", monkeypatch)
    assert loaded_from.startswith("memory://kiln-restore-"), loaded_from


def test_an_s3_object_streamed_in_parts_appears_whole_on_close_and_never_after_a_failure(s3):
    from data_pipeline.transfer import S3PartWriter

    folder = f"s3://{s3}/parts-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.filesystem(folder)
    part = 5 << 20  # S3's smallest part
    payload = bytes(range(256)) * (12 * 4096) + b"tail"  # 12 MiB and a tail: 3 parts, the last short
    with S3PartWriter(fs, f"{folder}/whole.bin", part_bytes=part, concurrency=2) as stream:
        for start in range(0, len(payload), (1 << 20) + 1):  # writes that straddle part boundaries
            stream.write(payload[start : start + (1 << 20) + 1])
        assert stream.tell() == len(payload)
    assert storage.read_bytes(f"{folder}/whole.bin") == payload
    with pytest.raises(RuntimeError), S3PartWriter(fs, f"{folder}/torn.bin", part_bytes=part) as stream:
        stream.write(payload)  # two parts already sent
        raise RuntimeError("the writer failed midway")
    assert not storage.exists(f"{folder}/torn.bin")
    storage.remove(folder, recursive=True)
