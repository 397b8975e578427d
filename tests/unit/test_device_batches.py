"""Training reads its batches one ahead (trainers/device_batches.py): the same batches in the same order, and a
checkpoint's cursor counts only the batches trained on, so a resume continues exactly where training stopped."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.dataset import Dataset
from data_pipeline.stream import TokenStream
from tests.helpers import numbered_dataset
from trainers.device_batches import DeviceBatches
from trainers.tasks.base import TaskBase

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    """23 sequences whose first token is their own index."""
    return numbered_dataset(str(tmp_path_factory.mktemp("ds")), range(23))


def stream(dataset: Dataset) -> TokenStream:
    """Rank 1 of 2, 3 sequences a micro-batch (an epoch is under 4 steps), read ahead by a thread as training does."""
    return TokenStream(dataset, "train", rank=1, world_size=2, micro_batch=3, seed=5, prefetch=2)


def test_reading_ahead_hands_out_the_streams_batches_and_saves_the_cursor_of_those_handed_out(dataset):
    plain, ahead = stream(dataset), DeviceBatches(stream(dataset), TaskBase(), "train", CPU)
    assert ahead.state_dict() == plain.state_dict()
    for _ in range(9):  # across two epoch ends
        expected, got = next(plain), next(ahead)
        assert torch.equal(got.tokens, torch.from_numpy(expected.tokens))
        assert torch.equal(got.positions, torch.from_numpy(expected.positions))
        assert ahead.state_dict() == plain.state_dict()  # the batch read ahead is not counted
        assert ahead.epoch == plain.epoch
    assert ahead.stream.position == plain.position + 6  # ... though the stream has served it
    plain.close()
    ahead.close()


def test_a_resume_from_the_saved_cursor_continues_with_the_next_batch_trained_on(dataset):
    ahead = DeviceBatches(stream(dataset), TaskBase(), "train", CPU)
    for _ in range(4):
        next(ahead)
    saved = ahead.state_dict()
    following = [next(ahead).tokens[:, 0].tolist() for _ in range(3)]
    resumed = DeviceBatches(stream(dataset), TaskBase(), "train", CPU)
    resumed.load_state_dict(saved)
    assert [next(resumed).tokens[:, 0].tolist() for _ in range(3)] == following
    ahead.load_state_dict(saved)  # what it had read ahead is dropped
    assert [next(ahead).tokens[:, 0].tolist() for _ in range(3)] == following
    ahead.close()
    resumed.close()
