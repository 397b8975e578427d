"""Trackers: where metrics go. metrics.jsonl is always written (rank 0); W&B when configured."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Protocol, cast

from data_pipeline import storage
from data_pipeline.redaction import redact
from trainers.config import TrackerConfig
from trainers.run.folder import METRICS_FILE, WANDB_DIR
from trainers.run.state import RunState

log = logging.getLogger("kiln.tracking")


class Tracker(Protocol):
    """Receives metrics on rank 0."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record metrics at a step."""

    def flush(self) -> None:
        """Make what was logged so far durable (called with every checkpoint)."""

    def finish(self, state: str) -> None:
        """Close, noting the run's final state (SUCCEEDED, FAILED, STOPPED, PREEMPTED)."""


class NullTracker:
    """For ranks other than 0, and `tracker=none`."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, state: str) -> None:
        pass


class JsonlTracker:
    """One JSON object per report in metrics.jsonl: what `kiln status` and plots read."""

    def __init__(self, url: str, min_flush_s: float = 5.0):
        self.url = url
        self._local = storage.is_local(url)
        self._lines: list[str] = []
        self._min_flush_s, self._last_flush = min_flush_s, 0.0
        if not self._local and storage.exists(url):  # object stores cannot append: keep what exists
            self._lines = storage.read_text(url).splitlines(keepends=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        line = json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n"
        if self._local:
            os.makedirs(os.path.dirname(self.url), exist_ok=True)
            with open(self.url, "a", encoding="utf-8") as handle:
                handle.write(line)
        else:
            self._lines.append(line)
            if time.monotonic() - self._last_flush >= self._min_flush_s:
                self._flush()

    def flush(self) -> None:
        if not self._local:
            self._flush()

    def finish(self, state: str) -> None:
        self.flush()

    def _flush(self) -> None:
        storage.write_atomic(self.url, "".join(self._lines))
        self._last_flush = time.monotonic()


def wandb_mode(cfg: TrackerConfig) -> str:
    """tracker.mode if set, else $WANDB_MODE, else offline: nothing leaves the machine by default."""
    return cfg.mode or os.environ.get("WANDB_MODE") or "offline"


class WandbTracker:
    """A W&B run whose id is the Kiln run id, so a resumed run continues the same W&B run."""

    def __init__(
        self,
        cfg: TrackerConfig,
        *,
        run_id: str,
        run_name: str,
        local_dir: str,
        config: dict,
        upload_to: str | None = None,
    ):
        import wandb

        self.local_dir, self.upload_to = local_dir, upload_to
        os.makedirs(local_dir, exist_ok=True)
        self._run = wandb.init(
            # Every value handed to W&B passes the one redaction (a tag can quote a secret as easily as a config).
            project=redact(cfg.project),
            entity=redact(cfg.entity),
            id=run_id,
            name=redact(run_name),
            dir=local_dir,
            # a str, not wandb's Literal: $WANDB_MODE may hold any value, and wandb.init checks it
            mode=cast(Any, wandb_mode(cfg)),
            resume="allow",
            tags=redact(list(cfg.tags)),
            group=redact(cfg.group),
            config=redact(config),
            settings=wandb.Settings(
                silent=True, console="off", save_code=False, disable_git=True, x_disable_stats=True
            ),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def flush(self) -> None:
        pass  # W&B's own process persists what was logged

    def finish(self, state: str) -> None:
        import wandb

        self._run.finish(exit_code=0 if state in (RunState.SUCCEEDED, RunState.STOPPED, RunState.PREEMPTED) else 1)
        # finish() can return before W&B's service has written the run file (often only its 7-byte header
        # is there yet); shutting the service down waits for it, so the upload below copies a whole run.
        wandb.teardown()
        if self.upload_to:  # a run on object storage keeps its W&B files there too
            try:
                storage.put_folder(os.path.join(self.local_dir, WANDB_DIR), self.upload_to)
            except OSError as exc:
                log.warning("could not copy W&B files to %s: %s", self.upload_to, exc)


class CompositeTracker:
    """Sends every call to each of its trackers."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def finish(self, state: str) -> None:
        for tracker in self.trackers:
            tracker.finish(state)


def build_tracker(
    cfg: TrackerConfig, *, rank: int, run_id: str, run_name: str, run_url: str, scratch_dir: str | None, config: dict
) -> Tracker:
    """Rank 0: metrics.jsonl plus W&B unless `tracker=none`; other ranks: nothing.

    W&B writes local files only: a local run keeps them in its folder; a run on object storage keeps
    them under scratch_dir and copies them to <run>/wandb/ when the tracker finishes.
    """
    if rank != 0:
        return NullTracker()
    trackers: list[Tracker] = [JsonlTracker(storage.join(run_url, METRICS_FILE))]
    if cfg.name == "wandb":
        local = storage.is_local(run_url)
        if local:
            local_dir = run_url
        elif scratch_dir is not None:
            local_dir = os.path.join(scratch_dir, WANDB_DIR, run_id)
        else:
            raise ValueError(f"W&B for a run on object storage ({run_url}) needs a scratch_dir for its local files")
        trackers.append(
            WandbTracker(
                cfg,
                run_id=run_id,
                run_name=run_name,
                local_dir=local_dir,
                config=config,
                upload_to=None if local else storage.join(run_url, WANDB_DIR),
            )
        )
    return CompositeTracker(trackers)
