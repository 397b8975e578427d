"""The run registry on storage: one folder per run holding run.json, config.yaml and metrics.jsonl.

run.json is the run's record for humans and tools (`kiln runs`, `kiln status`); only the driver
writes it, always whole (an atomic replace or a single PUT).
"""

from __future__ import annotations

import builtins
import difflib
import json
import os
import tempfile
from dataclasses import dataclass

from data_pipeline import storage
from data_pipeline.redaction import redact_text
from orchestrator.run.metrics import MetricRow
from orchestrator.run.record import RunRecord, now  # callers import these from here too
from orchestrator.run.record_codec import NewerFormat
from trainers.run import folder as run_folder
from trainers.run.folder import CONFIG_FILE, METRICS_FILE, RUN_FILE
from trainers.run.state import transition


class UnknownRun(LookupError):
    """No run with that id under the storage root; the message lists what there is."""


class RunExists(FileExistsError):
    """A run with that id already exists."""


class DamagedRun(ValueError):
    """A run whose run.json cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class DamagedEntry:
    """A run folder whose run.json is damaged, as `kiln runs` lists it."""

    run_id: str
    problem: str


class RunRegistry:
    """Runs under one storage root."""

    def __init__(self, root: str):
        self.root = root

    def run_url(self, run_id: str) -> str:
        """The run's folder."""
        return run_folder.run_url(self.root, run_id)

    def check_root(self) -> None:
        """Fail, naming storage.root, unless runs can be created there (a local folder is probed by a write)."""
        from orchestrator.config import UsageError

        if not storage.is_local(self.root):
            storage.exists(self.root)  # a missing bucket or denied access fails here, naming the URL
            return
        path = self.root.removeprefix("file://")
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(
                f"storage.root={self.root} is a file, not a folder; point storage.root "
                "(or KILN_STORAGE_ROOT) at a folder"
            )
        try:
            os.makedirs(path, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".kiln-write-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UsageError(
                f"storage.root={self.root} is not writable ({exc.strerror or exc}); choose a "
                "folder you can write to, or fix its permissions"
            ) from None

    def create(self, record: RunRecord, config_yaml: str) -> RunRecord:
        """Register a new run in a folder of its own: run.json (PENDING) claimed exclusively, then config.yaml."""
        run_dir = self.run_url(record.run_id)
        found = storage.list_names(run_dir)
        if RUN_FILE in found:
            raise RunExists(
                f"run {record.run_id!r} already exists under {self.root}; "
                f"choose another run.id (or leave it unset for a fresh one)"
            )
        if found:
            # Checkpoints or logs of a run whose record is gone: writing here would mix two runs.
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise RunExists(
                f"{run_dir} already holds files ({shown}) but no {RUN_FILE}: it is not a run Kiln "
                "can continue; move it aside or choose another run.id"
            )
        storage.makedirs(run_dir)
        record.updated = now()
        try:
            storage.write_new(storage.join(run_dir, RUN_FILE), redact_text(record.to_json()))
        except FileExistsError:
            raise RunExists(
                f"run {record.run_id!r} was just created under {self.root} by another command; choose another run.id"
            ) from None
        record._written_state = record.state
        self.write_config(record.run_id, config_yaml)
        return record

    def write_config(self, run_id: str, config_yaml: str) -> None:
        """Store the resolved (already redacted) config."""
        storage.write_atomic(storage.join(self.run_url(run_id), CONFIG_FILE), config_yaml)

    def save(self, record: RunRecord) -> None:
        """Write run.json whole; a changed state must be a legal move (IllegalTransition otherwise)."""
        transition(record._written_state, record.state)
        record.updated = now()
        storage.write_atomic(storage.join(self.run_url(record.run_id), RUN_FILE), redact_text(record.to_json()))
        record._written_state = record.state

    def load(self, run_id: str) -> RunRecord:
        """The record of run_id; UnknownRun naming the root and the closest ids; DamagedRun if unreadable."""
        url = storage.join(self.run_url(run_id), RUN_FILE)
        try:
            text = storage.read_bytes(url).decode("utf-8", errors="replace")
            record = RunRecord.from_json(text)
        except NewerFormat as exc:
            raise DamagedRun(f"run {run_id}: {url} {exc}") from None
        except ValueError as exc:
            raise DamagedRun(
                f"run {run_id}: {url} is damaged ({exc}); restore it from a backup, or move the "
                f"run folder aside (its checkpoints stay usable with `kiln export`)"
            ) from None
        except FileNotFoundError:
            known = self.run_ids()
            close = difflib.get_close_matches(run_id, known, n=3, cutoff=0.5)
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else (
                    "; `kiln runs` lists them"
                    if known
                    else "; no runs there yet (set storage.root or KILN_STORAGE_ROOT if they live elsewhere)"
                )
            )
            raise UnknownRun(f"unknown run {run_id!r} under {self.root}{hint}") from None
        if record.run_id != run_id:
            raise DamagedRun(
                f"run {run_id}: {url} names another run ({record.run_id!r}); a copied or moved "
                "folder? rename the folder back, or fix run_id in the file"
            )
        return record

    def run_ids(self) -> list[str]:
        """Ids of every run under the root (folders holding a run.json)."""
        return [
            name for name in storage.list_names(self.root) if storage.exists(storage.join(self.root, name, RUN_FILE))
        ]

    def list(self) -> tuple[list[RunRecord], list[DamagedEntry]]:
        """Every readable run's record (newest first), and the runs whose run.json is damaged."""
        records, damaged = [], []
        for run_id in self.run_ids():
            try:
                records.append(self.load(run_id))
            except UnknownRun:
                continue  # deleted while listing
            except DamagedRun as exc:
                damaged.append(DamagedEntry(run_id, str(exc)))
        return sorted(records, key=lambda r: r.created, reverse=True), damaged

    # builtins.list: in this class body, after the method RunRegistry.list, a bare `list` names that method
    def metrics(self, run_id: str) -> builtins.list[MetricRow]:
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
