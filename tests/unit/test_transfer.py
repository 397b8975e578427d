"""Parallel, hashed transfers (data_pipeline/transfer.py): how a file is cut into parts, and a copy that
hashes the bytes as they arrive gives the digest of the file itself."""

from __future__ import annotations

import hashlib

from data_pipeline import storage, transfer

MiB = 1 << 20


def test_a_part_is_at_least_the_minimum_and_keeps_every_request_busy_on_big_files():
    assert transfer.part_size(1000) == transfer.MIN_PART_BYTES
    assert transfer.part_size(200 * MiB, concurrency=4) == 50 * MiB  # 4 parts
    assert transfer.part_size(201 * MiB + 1, concurrency=4) == 51 * MiB  # whole MiB
    assert transfer.part_size(10 << 30, concurrency=8) == transfer.MAX_PART_BYTES


def test_a_huge_file_takes_bigger_parts_than_the_cap_to_stay_within_s3s_part_limit():
    size = 1 << 40
    part = transfer.part_size(size)
    assert part > transfer.MAX_PART_BYTES and len(transfer.spans(size, part)) <= transfer.MAX_PARTS


def test_spans_cover_the_file_exactly():
    assert transfer.spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert transfer.spans(0, 4) == []


def test_a_parallel_download_hashes_and_copies_the_file_in_order(monkeypatch, tmp_path):
    monkeypatch.setattr(transfer, "MIN_PART_BYTES", MiB)
    payload = bytes(range(256)) * (13 * 4096) + b"tail"  # 3.25 MiB and a tail: 4 parts of 1 MiB, the last short
    url = "memory://kiln-transfer-test/shard.bin"
    storage.write_atomic(url, payload)
    fs, path = storage.filesystem(url)
    copy = tmp_path / "shard.bin"
    try:
        digest = transfer.download_hashed(fs, path, len(payload), str(copy), concurrency=2)
    finally:
        fs.rm(path)
    assert digest == hashlib.sha256(payload).hexdigest()
    assert copy.read_bytes() == payload
