"""Fine-tuning data through the stream: each sequence's loss mask or label travels with its tokens,
and a resumed stream (on another world size, reading ahead or not) continues exactly."""

from __future__ import annotations

import numpy as np
import pytest

import data_pipeline.dataset as ds
from data_pipeline.batch import LABELS, LOSS_MASK, Batch
from data_pipeline.dataset import Dataset, DatasetError, ExampleWriter, ShardWriter, open_training_data, write_manifest
from data_pipeline.stream import TokenStream

SEQ = 6


def mask_of(number: int) -> list[int]:
    """The mask stored with sequence `number`: a pattern that differs between neighbours."""
    return [0, number % 2, 1, (number // 2) % 2, 0, 1]


def manifest(url: str, kind: str, splits: dict) -> Dataset:
    write_manifest(
        url,
        {
            "kind": kind,
            "seq_len": SEQ,
            "vocab_size": 1000,
            "eos_id": 999,
            "dtype": "<u2",
            "tokenizer": {"sha256": "same"},
            "splits": splits,
        },
    )
    return Dataset(url)


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Dataset:
    """41 chat sequences over 5 shards; sequence n starts with token n and stores mask_of(n)."""
    url = str(tmp_path_factory.mktemp("chat"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ds, "SHARD_TOKENS", 9 * SEQ)
        writer = ShardWriter(url, "train", seq_len=SEQ, vocab_size=1000, eos_id=999, with_mask=True)
        for n in range(41):
            writer.add([n, 1, 2, 3, 4, 999], mask_of(n))
        return manifest(url, "chat", {"train": writer.close()})


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Dataset:
    """23 classification examples over 3 shards; example n starts with token n and has label n % 3."""
    url = str(tmp_path_factory.mktemp("cls"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ds, "SHARD_TOKENS", 10 * SEQ)
        writer = ExampleWriter(url, "train", seq_len=SEQ, vocab_size=1000, eos_id=999)
        for n in range(23):
            writer.add([n, 5, 6], label=n % 3)
        return manifest(url, "classification", {"train": writer.close()})


def rows(batch: Batch[np.ndarray]) -> list[tuple]:
    """Each row as (first token, its mask, its label), comparable across streams."""
    masks = batch.loss_mask.tolist() if batch.loss_mask is not None else [None] * len(batch.tokens)
    labels = batch.labels.tolist() if batch.labels is not None else [None] * len(batch.tokens)
    return [(int(t[0]), m, lab) for t, m, lab in zip(batch.tokens, masks, labels, strict=True)]


def consume(source, world: int, steps: int, state: dict | None = None, prefetch: int = 0) -> tuple[list, dict]:
    """`steps` global steps of `world` ranks (rank order), optionally from a saved cursor."""
    streams = [
        TokenStream(source, "train", rank=r, world_size=world, micro_batch=2, seed=13, prefetch=prefetch)
        for r in range(world)
    ]
    try:
        for stream in streams:
            if state:
                stream.load_state_dict(state)
        seen = [row for _ in range(steps) for s in streams for row in rows(next(s))]
        return seen, streams[0].state_dict()
    finally:
        for stream in streams:
            stream.close()


def test_chat_batches_carry_each_sequences_own_loss_mask(chat):
    assert chat.kind == "chat" and chat.fields == (LOSS_MASK,)
    batch = next(TokenStream(chat, "train", rank=0, world_size=1, micro_batch=41, seed=3))
    assert batch.labels is None and batch.loss_mask is not None
    assert batch.tokens.shape == batch.loss_mask.shape == (41, SEQ) and batch.loss_mask.dtype == np.uint8
    assert sorted(batch.tokens[:, 0].tolist()) == list(range(41))  # a whole epoch, shuffled
    for first, mask, _ in rows(batch):
        assert mask == mask_of(first)


def test_classification_batches_carry_each_examples_label(labelled):
    assert labelled.fields == (LABELS,)
    batch = next(TokenStream(labelled, "train", rank=1, world_size=2, micro_batch=5, seed=3))
    assert batch.loss_mask is None and batch.labels is not None and batch.labels.shape == (5,)
    assert [label for _, _, label in rows(batch)] == [first % 3 for first, _, _ in rows(batch)]


@pytest.mark.parametrize("world_before, world_after, prefetch", [(1, 3, 0), (2, 1, 2), (3, 2, 1)])
def test_a_resumed_stream_yields_the_same_tokens_masks_and_labels_as_an_uninterrupted_one(
    chat, labelled, world_before, world_after, prefetch
):
    for source in (chat, labelled):
        reference, _ = consume(source, 1, 100)  # past an epoch: the reshuffle is resumed too
        before, state = consume(source, world_before, 7, prefetch=prefetch)
        after, _ = consume(source, world_after, 60 // world_after, state, prefetch=prefetch)
        resumed = before + after
        assert resumed == reference[: len(resumed)] and len(resumed) > 2 * source.shards("train")[0].sequences


def test_pretraining_batches_are_tokens_alone(tmp_path):
    writer = ShardWriter(str(tmp_path), "train", seq_len=SEQ, vocab_size=1000, eos_id=999)
    for n in range(5):
        writer.add([n, 1, 2, 3, 4])
    plain = manifest(str(tmp_path), "pretrain", {"train": writer.close()})
    batch = next(TokenStream(plain, "train", rank=0, world_size=1, micro_batch=2, seed=0))
    assert plain.fields == () and batch.loss_mask is None and batch.labels is None


def test_a_mixture_of_chat_and_pretraining_data_is_refused_naming_both(chat, tmp_path):
    writer = ShardWriter(str(tmp_path), "train", seq_len=SEQ, vocab_size=1000, eos_id=999)
    writer.add([1, 2, 3, 4, 5])
    manifest(str(tmp_path), "pretrain", {"train": writer.close()})

    class Part:
        def __init__(self, path):
            self.path, self.weight = path, 1.0

    with pytest.raises(DatasetError, match=f"{tmp_path} has a different kind than {chat.url}"):
        open_training_data("mixture", None, [Part(chat.url), Part(str(tmp_path))])
