"""`kiln eval`'s slice is decided before any model runs (orchestrator/cli/evaluate.py)."""

from types import SimpleNamespace

import pytest

from orchestrator.cli.evaluate import plan_dataset_slice, plan_run_slice
from orchestrator.config import UsageError

RUN = SimpleNamespace(train=SimpleNamespace(micro_batch=4, eval_batches=3, seed=7))


def test_a_runs_own_slice_is_what_its_workers_read():
    plan = plan_run_slice(RUN, 2, None, None)
    assert (plan.world_size, plan.micro_batch, plan.batches, plan.seed) == (2, 4, 3, 7)
    with pytest.raises(UsageError, match="without --data"):
        plan_run_slice(RUN, 2, 8, None)


@pytest.mark.parametrize(
    ("cfg", "available", "micro_batch", "batches", "expected"),
    [
        (RUN, 100, None, None, (4, 6, 7)),  # a run: as many sequences as its 2 workers' evaluation read
        (None, 100, None, None, (8, 12, 0)),  # a folder: the whole split in batches of 8
        (None, 5, None, None, (5, 1, 0)),  # a split smaller than one batch
        (None, 100, 10, 2, (10, 2, 0)),
    ],
)
def test_a_datasets_slice(cfg, available, micro_batch, batches, expected):
    plan = plan_dataset_slice("data/x", available, cfg, 2, micro_batch, batches)
    assert (plan.micro_batch, plan.batches, plan.seed) == expected and plan.world_size == 1


def test_a_slice_larger_than_the_split_or_empty_is_refused():
    with pytest.raises(UsageError, match="has 10; ask for fewer"):
        plan_dataset_slice("data/x", 10, None, 1, 4, 3)
    with pytest.raises(UsageError, match="--micro-batch must be >= 1"):
        plan_dataset_slice("data/x", 10, None, 1, 0, 2)
