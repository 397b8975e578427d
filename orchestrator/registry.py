"""The run registry on storage: one folder per run holding run.json, config.yaml and metrics.jsonl.

run.json is the run's record for humans and tools (`kiln runs`, `kiln status`); only the driver
writes it, always whole (an atomic replace or a single PUT).
"""

from __future__ import annotations

import difflib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from data_pipeline import storage

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# PREEMPTED: stopped early with a committed checkpoint (SIGTERM, `kiln stop`); `kiln resume` continues it.
STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED", "PREEMPTED")
RESUMABLE = ("RUNNING", "FAILED", "STOPPED", "PREEMPTED")
FORMAT_VERSION = 1


class UnknownRun(LookupError):
    """No run with that id under the storage root; the message lists what there is."""


class RunExists(FileExistsError):
    """A run with that id already exists."""


def now() -> str:
    """UTC timestamp, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class RunRecord:
    """What run.json holds."""

    run_id: str
    state: str = "PENDING"
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    experiment: str = "run"
    step: int = 0
    max_steps: int = 0
    checkpoint: Optional[dict] = None  # {"step": int, "uri": str} of the last committed checkpoint
    strategy: str = "ddp"
    num_workers: int = 0
    wandb: Optional[dict] = None  # {"mode", "run_id", "dir"}
    attempts: list[dict] = field(default_factory=list)  # one per worker group, with how it ended
    error: Optional[str] = None
    notes: list[str] = field(default_factory=list)  # recoveries worth knowing (skipped checkpoints, stops)
    events_cursor: str = ""  # the last events/ entry folded into attempts
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, text: str) -> "RunRecord":
        """Parse run.json, ignoring fields a newer Kiln added."""
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class RunRegistry:
    """Runs under one storage root."""

    def __init__(self, root: str):
        self.root = root

    def run_url(self, run_id: str) -> str:
        """The run's folder."""
        return storage.join(self.root, run_id)

    def create(self, record: RunRecord, config_yaml: str) -> RunRecord:
        """Register a new run: config.yaml first, then run.json (PENDING)."""
        if storage.exists(storage.join(self.run_url(record.run_id), RUN_FILE)):
            raise RunExists(f"run {record.run_id!r} already exists under {self.root}; "
                            f"choose another run.id (or leave it unset for a fresh one)")
        storage.makedirs(self.run_url(record.run_id))
        self.write_config(record.run_id, config_yaml)
        self.save(record)
        return record

    def write_config(self, run_id: str, config_yaml: str) -> None:
        """Store the resolved (already redacted) config."""
        storage.write_atomic(storage.join(self.run_url(run_id), CONFIG_FILE), config_yaml)

    def save(self, record: RunRecord) -> None:
        """Write run.json whole."""
        if record.state not in STATES:
            raise ValueError(f"unknown run state {record.state!r}")
        record.updated = now()
        storage.write_atomic(storage.join(self.run_url(record.run_id), RUN_FILE),
                             json.dumps(asdict(record), indent=2))

    def load(self, run_id: str) -> RunRecord:
        """The record of run_id, or UnknownRun naming the root and the closest ids."""
        try:
            return RunRecord.from_json(storage.read_text(storage.join(self.run_url(run_id), RUN_FILE)))
        except FileNotFoundError:
            known = self.run_ids()
            close = difflib.get_close_matches(run_id, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else (
                "; `kiln runs` lists them" if known else "; no runs there yet (set storage.root or "
                                                        "KILN_STORAGE_ROOT if they live elsewhere)")
            raise UnknownRun(f"unknown run {run_id!r} under {self.root}{hint}") from None

    def run_ids(self) -> list[str]:
        """Ids of every run under the root (folders holding a run.json)."""
        return [name for name in storage.list_names(self.root)
                if storage.exists(storage.join(self.root, name, RUN_FILE))]

    def list(self) -> list[RunRecord]:
        """Every run's record, newest first."""
        records = []
        for run_id in self.run_ids():
            try:
                records.append(self.load(run_id))
            except (UnknownRun, json.JSONDecodeError, TypeError):
                continue
        return sorted(records, key=lambda r: r.created, reverse=True)

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """Every line of the run's metrics.jsonl (a torn last line is skipped)."""
        try:
            text = storage.read_text(storage.join(self.run_url(run_id), METRICS_FILE))
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric name."""
        latest: dict[str, float] = {}
        for row in self.metrics(run_id):
            latest.update({k: v for k, v in row.items() if k not in ("step", "time")})
        return latest
