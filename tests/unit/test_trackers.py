"""Every Tracker keeps the same contract (tests/helpers.py: TrackerContract): metrics.jsonl on local disk
and on object storage, and the composite that fans out to several. W&B starts its own service process,
so its run of the contract is in tests/integration/test_wandb_tracker.py."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline import storage
from tests.helpers import TrackerContract
from trainers.tracking import CompositeTracker, JsonlTracker


def by_step(text: str) -> dict[int, dict]:
    """metrics.jsonl's reports merged per step, without the bookkeeping keys."""
    steps: dict[int, dict] = {}
    for line in text.splitlines():
        row = json.loads(line)
        steps.setdefault(row.pop("step"), {}).update({k: v for k, v in row.items() if k != "time"})
    return steps


def memory_url(folder: Path) -> str:
    """A metrics.jsonl on memory:// (an object store: no append) unique to the test's folder."""
    return f"memory://{folder}/metrics.jsonl"


class TestJsonlTrackerOnLocalDisk(TrackerContract):
    def tracker(self, folder):
        return JsonlTracker(str(folder / "metrics.jsonl"))

    def logged(self, folder):
        return by_step((folder / "metrics.jsonl").read_text())


class TestJsonlTrackerOnObjectStorage(TrackerContract):
    def tracker(self, folder):
        return JsonlTracker(memory_url(folder))

    def logged(self, folder):
        return by_step(storage.read_text(memory_url(folder)))


class TestCompositeTracker(TrackerContract):
    def tracker(self, folder):
        return CompositeTracker([JsonlTracker(str(folder / "metrics.jsonl")), JsonlTracker(memory_url(folder))])

    def logged(self, folder):
        local, remote = by_step((folder / "metrics.jsonl").read_text()), by_step(storage.read_text(memory_url(folder)))
        assert local == remote  # every tracker got every call
        return local


def test_a_resumed_run_on_object_storage_keeps_the_reports_before_it(tmp_path):
    first = JsonlTracker(memory_url(tmp_path))
    first.log({"train/loss": 2.5}, step=1)
    first.finish("PREEMPTED")
    resumed = JsonlTracker(memory_url(tmp_path))  # an object store cannot append: it rewrites the whole file
    resumed.log({"train/loss": 2.0}, step=2)
    resumed.finish("SUCCEEDED")
    assert by_step(storage.read_text(memory_url(tmp_path))) == {1: {"train/loss": 2.5}, 2: {"train/loss": 2.0}}
