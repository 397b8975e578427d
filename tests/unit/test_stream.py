"""The data stream: every rank its own slice of one global order, resumable on any world size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.batch import Batch
from data_pipeline.dataset import Dataset
from data_pipeline.stream import TokenStream
from tests.helpers import numbered_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    """97 sequences whose first token is their own index, spread over 10 shards."""
    made = numbered_dataset(str(tmp_path_factory.mktemp("ds")), range(97))
    assert len(made.shards("train")) == 10
    return made


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Dataset:
    """61 sequences numbered 500..560."""
    return numbered_dataset(str(tmp_path_factory.mktemp("other")), range(500, 561))


def ids(batch: Batch[np.ndarray]) -> list[int]:
    return batch.tokens[:, 0].tolist()


def test_ranks_get_disjoint_slices_of_one_global_order(dataset):
    streams = [TokenStream(dataset, "train", rank=r, world_size=2, micro_batch=3, seed=7) for r in range(2)]
    seen = [i for _ in range(16) for s in streams for i in ids(next(s))]
    assert sorted(seen[:96]) == sorted(set(seen[:96]))  # one epoch-worth with no repeats
    assert streams[0].state_dict() == streams[1].state_dict()


def test_same_seed_same_order_other_seed_other_order(dataset):
    a = TokenStream(dataset, "train", rank=0, world_size=1, micro_batch=5, seed=1)
    b = TokenStream(dataset, "train", rank=0, world_size=1, micro_batch=5, seed=1)
    c = TokenStream(dataset, "train", rank=0, world_size=1, micro_batch=5, seed=2)
    assert ids(next(a)) == ids(next(b)) != ids(next(c))


def test_epochs_are_reshuffled_and_complete(dataset):
    s = TokenStream(dataset, "train", rank=0, world_size=1, micro_batch=97, seed=3)
    first, second = ids(next(s)), ids(next(s))
    assert sorted(first) == sorted(second) == list(range(97))
    assert first != second and s.epoch == 2


def test_resume_rejects_a_different_seed(dataset):
    s = TokenStream(dataset, "train", rank=0, world_size=1, micro_batch=2, seed=1)
    other = TokenStream(dataset, "train", rank=0, world_size=1, micro_batch=2, seed=9)
    with pytest.raises(ValueError, match="train.seed"):
        other.load_state_dict(s.state_dict())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    world_before=st.integers(1, 4),
    world_after=st.integers(1, 4),
    micro=st.integers(1, 5),
    steps_before=st.integers(0, 12),
    seed=st.integers(0, 2**31),
    mixed=st.booleans(),
)
def test_every_sequence_once_per_epoch_across_a_world_size_change(
    dataset, other, world_before, world_after, micro, steps_before, seed, mixed
):
    """Stop anywhere, resume on another number of workers: the consumed order is the uninterrupted one."""
    sources, weights = ([dataset, other], [0.6, 0.4]) if mixed else (dataset, None)

    def run(world, steps, state=None):
        streams = [
            TokenStream(sources, "train", rank=r, world_size=world, micro_batch=micro, seed=seed, weights=weights)
            for r in range(world)
        ]
        if state:
            for s in streams:
                s.load_state_dict(state)
        out = []
        for _ in range(steps):
            for s in streams:
                out.extend(ids(next(s)))
        return out, streams[0].state_dict()

    before, state = run(world_before, steps_before)
    total = 97 * 2
    after_steps = -(-(total - len(before)) // (world_after * micro))
    after, _ = run(world_after, after_steps, state)
    consumed = (before + after)[:total]
    reference, _ = run(1, total // micro + 1)
    assert consumed == reference[:total]
    if mixed:  # within each part's own epoch, no sequence repeats
        for part in ([i for i in consumed if i < 97][:97], [i for i in consumed if i >= 500][:61]):
            assert len(set(part)) == len(part)
    else:
        assert sorted(consumed[:97]) == list(range(97))


def test_reading_ahead_gives_the_same_batches_and_cursor(dataset):
    plain = TokenStream(dataset, "train", rank=1, world_size=2, micro_batch=3, seed=5)
    ahead = TokenStream(dataset, "train", rank=1, world_size=2, micro_batch=3, seed=5, prefetch=2)
    try:
        for _ in range(5):
            assert ids(next(plain)) == ids(next(ahead))
        assert ahead.state_dict() == plain.state_dict()
        saved = plain.state_dict()
        next(plain)
        ahead.load_state_dict(saved)  # rewinds past what was read ahead
        resumed = TokenStream(dataset, "train", rank=1, world_size=2, micro_batch=3, seed=5)
        resumed.load_state_dict(saved)
        assert ids(next(ahead)) == ids(next(resumed))
    finally:
        ahead.close()


def test_mixture_honours_weights_exactly_per_period(dataset, other):
    stream = TokenStream([dataset, other], "train", rank=0, world_size=1, micro_batch=100, seed=11, weights=[0.7, 0.3])
    drawn = [i for _ in range(20) for i in ids(next(stream))]
    assert sum(i < 97 for i in drawn) == 1400 and sum(i >= 500 for i in drawn) == 600
    first_97_of_a = [i for i in drawn if i < 97][:97]
    assert sorted(first_97_of_a) == list(range(97))  # each part still walks its own epochs
    assert stream.source_positions(2000) == [1400, 600]


def test_mixture_state_must_match(dataset, other):
    mixed = TokenStream([dataset, other], "train", rank=0, world_size=1, micro_batch=2, seed=1, weights=[1, 1])
    reweighted = TokenStream([dataset, other], "train", rank=0, world_size=1, micro_batch=2, seed=1, weights=[2, 1])
    with pytest.raises(ValueError, match="weights"):
        reweighted.load_state_dict(mixed.state_dict())


@pytest.mark.parametrize("world_size, micro_batch", [(1, 6), (2, 3), (3, 2)])
def test_each_row_carries_its_global_position_whatever_the_world_size(dataset, world_size, micro_batch):
    """Position p holds the same sequence at any world size, so what a task draws from p resumes exactly."""
    single = TokenStream(dataset, "train", rank=0, world_size=1, micro_batch=30, seed=7)
    reference = next(single)
    assert reference.positions.tolist() == list(range(30))
    streams = [
        TokenStream(dataset, "train", rank=r, world_size=world_size, micro_batch=micro_batch, seed=7)
        for r in range(world_size)
    ]
    rows = {}
    for _ in range(30 // (world_size * micro_batch)):
        for stream in streams:
            batch = next(stream)
            rows.update(zip(batch.positions.tolist(), ids(batch), strict=True))
    assert rows == dict(zip(range(30), ids(reference), strict=True))
    assert streams[0].state_dict() == single.state_dict()  # the saved cursor is what it always was
