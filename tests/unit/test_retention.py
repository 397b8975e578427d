"""Which checkpoints retention keeps and which one a restore loads: decisions over step numbers, no storage."""

from __future__ import annotations

import pytest

from trainers.checkpoint.policy import Choice, choose_checkpoint, retention

# (folders on storage, the committed ones, keep_last, keep_every, pinned) -> (kept, deleted), newest first
RETENTION = [
    pytest.param([3, 2, 1], {1, 2, 3}, 0, 0, 3, ([3, 2, 1], []), id="keep_last=0 keeps every committed"),
    pytest.param([3, 2, 1], {1, 2, 3}, 2, 0, 3, ([3, 2], [1]), id="the newest keep_last"),
    pytest.param([1, 3, 2], {1, 2, 3}, 2, 0, 3, ([3, 2], [1]), id="listing order does not matter"),
    pytest.param([7, 6, 5, 4, 3, 2, 1], {1, 3, 4, 5, 6, 7}, 2, 3, 7, ([7, 6, 3], [5, 4, 2, 1]), id="plus every kth"),
    pytest.param([4, 3, 2], {2, 4}, 0, 0, 4, ([4, 2], [3]), id="uncommitted leftovers go even when keeping all"),
    pytest.param([9, 5], {9, 5}, 1, 0, 5, ([9, 5], []), id="pinned survives newer committed ones"),
    pytest.param([6, 5], {6}, 1, 0, 5, ([6, 5], []), id="pinned is kept before its manifest is seen"),
    pytest.param([0, 10, 20], {0, 10, 20}, 1, 10, 20, ([20, 10, 0], []), id="step 0 is a multiple of keep_every"),
    pytest.param([5, 4], set(), 3, 2, None, ([], [5, 4]), id="nothing committed, nothing pinned"),
    pytest.param([], set(), 2, 0, 1, ([], []), id="no folders"),
]


@pytest.mark.parametrize("steps, committed, keep_last, keep_every, pinned, expected", RETENTION)
def test_retention(steps, committed, keep_last, keep_every, pinned, expected):
    assert retention(steps, committed, keep_last=keep_last, keep_every=keep_every, pinned=pinned) == expected


def test_retention_keeps_every_folder_exactly_once():
    steps, committed = list(range(30, 0, -1)), {s for s in range(1, 31) if s % 4}
    kept, deleted = retention(steps, committed, keep_last=3, keep_every=5, pinned=30)
    assert sorted(kept + deleted) == sorted(steps) and not set(kept) & set(deleted)
    assert set(kept) <= committed | {30}


# verdicts newest first: (step, why it fails verification, or None) -> (chosen step, skipped reasons)
CHOICES = [
    pytest.param([(3, None), (2, None)], Choice(3, []), id="the newest that verifies"),
    pytest.param([(3, "sha256 mismatch"), (2, None)], Choice(2, ["sha256 mismatch"]), id="falls back one"),
    pytest.param([(3, "a"), (2, "b"), (1, None)], Choice(1, ["a", "b"]), id="falls back past several, in order"),
    pytest.param([(2, "a"), (1, "b")], Choice(None, ["a", "b"]), id="none verifies"),
    pytest.param([], Choice(None, []), id="no committed checkpoint"),
]


@pytest.mark.parametrize("verdicts, expected", CHOICES)
def test_choose_checkpoint(verdicts, expected):
    assert choose_checkpoint(verdicts) == expected


def test_choose_checkpoint_stops_drawing_at_the_chosen_step():
    verified = []

    def verdicts():
        for step, problem in [(4, "damaged"), (3, None), (2, None), (1, None)]:
            verified.append(step)  # stands for the checksum pass over a whole checkpoint
            yield step, problem

    assert choose_checkpoint(verdicts()) == Choice(3, ["damaged"])
    assert verified == [4, 3]
