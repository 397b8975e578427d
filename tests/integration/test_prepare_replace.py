"""Preparing again into a good dataset never damages it: a failed `kiln prepare` leaves every old file
byte for byte (local folder and object store), stops at the first bad record before any tokenizer work,
and refuses a validation split that training could not evaluate on."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import storage
from data_pipeline.dataset import open_dataset
from data_pipeline.prepare import PrepareConfig, PrepareError, prepare
from data_pipeline.stream import TokenStream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
WORDS = ["alpha", "beta", "gamma", "delta", "kiln", "ray", "token", "shard"]


@pytest.fixture(scope="module", autouse=True)
def ray_for_this_module(s3):
    """prepare() starts Ray in this process: one for the module (its workers see the s3 server), gone after it."""
    yield
    import ray

    ray.shutdown()


def write_documents(path: Path, n: int, seed: int, bad_line: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    lines = [
        json.dumps({"text": f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60))))})
        for i in range(n)
    ]
    if bad_line is not None:
        lines.insert(bad_line - 1, "{broken json")
    path.write_text("\n".join(lines) + "\n")


def hashes(url: str) -> dict[str, str]:
    """sha256 of every file below a dataset folder (local or s3), by relative path."""
    return {
        rel: hashlib.sha256(storage.read_bytes(storage.join(url, rel))).hexdigest()
        for rel, _ in storage.walk_files(url)
    }


def first_batch(url: str) -> np.ndarray:
    return next(
        TokenStream(open_dataset(url), "val", rank=0, world_size=1, micro_batch=2, seed=0, shuffle=False)
    ).tokens


def settings(raw: Path, out: str, **more) -> PrepareConfig:
    return PrepareConfig(
        **{"input": str(raw), "output": out, "seq_len": 32, "vocab_size": 400, "val_fraction": 0.2, **more}
    )


def fail_to_prepare_again(raw: Path, out: str, tmp_path: Path) -> list[str]:
    """A re-prepare with other settings over input holding a bad record, on_bad_record=fail: it must fail."""
    write_documents(tmp_path / "bad.jsonl", 150, seed=2, bad_line=120)
    logged: list[str] = []
    with pytest.raises(PrepareError, match=r"bad record: .*bad.jsonl:120: malformed JSON"):
        prepare(settings(tmp_path / "bad.jsonl", out, seq_len=16, on_bad_record="fail"), log=logged.append)
    return logged


def test_a_failed_prepare_leaves_the_local_dataset_exactly_as_it_was(tmp_path):
    write_documents(tmp_path / "good.jsonl", 200, seed=1)
    out = str(tmp_path / "prepared")
    prepare(settings(tmp_path / "good.jsonl", out), log=lambda _: None)
    before, batch = hashes(out), first_batch(out)

    logged = fail_to_prepare_again(tmp_path / "good.jsonl", out, tmp_path)
    assert hashes(out) == before and np.array_equal(first_batch(out), batch)
    # stopped at the bad record before any tokenizer was trained
    assert not any("training a byte-level BPE tokenizer" in line for line in logged), logged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "prepared"]

    # too few documents for a validation split: refused, old dataset still whole
    write_documents(tmp_path / "tiny.jsonl", 6, seed=3)
    with pytest.raises(
        PrepareError,
        match=r"the validation split of .* would be empty: val_fraction=0.01 put \d of 6 "
        r"documents in it.*; add more data",
    ):
        prepare(
            PrepareConfig(
                input=str(tmp_path / "tiny.jsonl"), output=out, seq_len=32, vocab_size=400, val_fraction=0.01
            ),
            log=lambda _: None,
        )
    assert hashes(out) == before

    # a successful re-prepare replaces it whole
    prepare(settings(tmp_path / "good.jsonl", out, seq_len=16), log=lambda _: None)
    assert open_dataset(out).seq_len == 16 and hashes(out) != before


def test_a_failed_prepare_leaves_the_s3_dataset_exactly_as_it_was(s3, tmp_path):
    write_documents(tmp_path / "good.jsonl", 200, seed=1)
    out = f"s3://{s3}/prepared-{uuid.uuid4().hex[:8]}"
    prepare(settings(tmp_path / "good.jsonl", out), log=lambda _: None)
    before, batch = hashes(out), first_batch(out)

    fail_to_prepare_again(tmp_path / "good.jsonl", out, tmp_path)
    assert hashes(out) == before and np.array_equal(first_batch(out), batch)

    # a prepare that died before its commit left data behind: the next one clears it
    storage.write_atomic(f"{out}/v-{'0' * 20}/train/shard_00000.bin", b"half written")
    prepare(settings(tmp_path / "good.jsonl", out, seq_len=16), log=lambda _: None)
    dataset = open_dataset(out)
    assert dataset.seq_len == 16 and len(first_batch(out)[0]) == 16
    (version,) = [name for name in storage.list_names(out) if name != "manifest.json"]
    assert all(rel.startswith(f"{version}/") for rel in hashes(out) if rel != "manifest.json")
    # a second dataset can reuse its tokenizer by the dataset's path
    summary = prepare(
        settings(tmp_path / "good.jsonl", f"{out}-copy", tokenizer=f"{out}/tokenizer"), log=lambda _: None
    )
    assert summary.documents == 200
    assert open_dataset(f"{out}-copy").manifest["tokenizer"]["sha256"] == dataset.manifest["tokenizer"]["sha256"]
