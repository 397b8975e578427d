"""Streaming sha256 (data_pipeline/storage.py): what checkpoints are verified and committed with."""

from __future__ import annotations

import hashlib
import io

from data_pipeline import storage, store_retry
from trainers.strategies.deepspeed_zero import hash_folder

PAYLOAD = bytes(range(256)) * 41 + b"tail"  # not a multiple of any small block size


def test_a_stream_hashes_and_copies_every_block(monkeypatch):
    monkeypatch.setattr(storage, "HASH_BLOCK_BYTES", 1000)
    copy = io.BytesIO()
    assert storage.sha256_stream(io.BytesIO(PAYLOAD), copy) == hashlib.sha256(PAYLOAD).hexdigest()
    assert copy.getvalue() == PAYLOAD
    assert storage.sha256_stream(io.BytesIO(b"")) == hashlib.sha256(b"").hexdigest()


def test_a_file_is_hashed_and_copied_again_whole_after_a_store_error(monkeypatch, tmp_path):
    monkeypatch.setattr(storage, "HASH_BLOCK_BYTES", 1000)
    monkeypatch.setattr(store_retry, "RETRY_BASE_S", 0.001)
    monkeypatch.delenv(store_retry.RETRIES_ENV, raising=False)
    url = "memory://kiln-sha256-test/shard.bin"
    storage.write_atomic(url, PAYLOAD)
    fs, _ = storage.filesystem(url)
    reads = []
    cat_file = fs.cat_file

    def drops_once(path, start=None, end=None, **kwargs):
        reads.append(start)
        if len(reads) == 1:
            raise ConnectionResetError("reset by peer")
        return cat_file(path, start=start, end=end, **kwargs)

    monkeypatch.setattr(fs, "cat_file", drops_once)
    copy_to = tmp_path / "copied" / "shard.bin"
    copy_to.parent.mkdir()
    copy_to.write_bytes(b"left by the failed attempt, longer than the file " * 300)
    try:
        assert storage.sha256_file(url, str(copy_to)) == hashlib.sha256(PAYLOAD).hexdigest()
    finally:
        fs.rm(url)
    assert len(reads) == 2 and copy_to.read_bytes() == PAYLOAD


def test_hash_folder_records_size_and_sha256_by_relative_path(tmp_path):
    (tmp_path / "zero" / "sub").mkdir(parents=True)
    (tmp_path / "zero" / "sub" / "a.pt").write_bytes(PAYLOAD)
    (tmp_path / "zero" / "b").write_bytes(b"")
    assert hash_folder(str(tmp_path)) == {
        "zero/sub/a.pt": (len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest()),
        "zero/b": (0, hashlib.sha256(b"").hexdigest()),
    }
