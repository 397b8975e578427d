"""A worker's checkpoints: when to take one, and everything needed to continue exactly from it.

A checkpoint holds the strategy's shards (model, optimizer) plus, per rank, the schedule, the data
stream's cursor and every RNG stream, so a restart replays the uninterrupted run bit for bit. The
bytes, manifests and verification are trainers/checkpoint/store.py's `CheckpointStore`.
"""

from __future__ import annotations

import logging
import time

from data_pipeline.stream import TokenStream
from trainers.checkpoint.shards import CheckpointedStrategy
from trainers.checkpoint.store import CheckpointStore
from trainers.device_batches import DeviceBatches
from trainers.rng import capture_rng, rank_seed, restore_rng, seed_everything

log = logging.getLogger("kiln.worker")


class Checkpointing:
    """Saves every `every` steps and at `last_step`; restores the newest committed checkpoint."""

    def __init__(
        self,
        store: CheckpointStore,
        strategy: CheckpointedStrategy,
        stream: TokenStream | DeviceBatches,  # whose state_dict is the cursor after the batches trained on
        *,
        every: int,
        last_step: int,
        seed: int,
        rank: int,
    ):
        self.store, self.strategy, self.stream = store, strategy, stream
        self.every, self.last_step, self.seed, self.rank = every, last_step, seed, rank
        self.saved_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether step `step` ends with a checkpoint."""
        return step % self.every == 0 or step == self.last_step

    def restore(self) -> tuple[int, dict]:
        """Load the newest committed checkpoint, if any: (its step or 0, what happened, for the run's events)."""
        restored = self.store.restore(self.strategy)
        if restored is None:
            return 0, {"restored_step": None, "skipped": []}
        committed, extra = restored.committed, restored.extra
        self.strategy.load_extra_state(extra.get("strategy") or {"scheduler": extra["scheduler"]})
        self.stream.load_state_dict(extra["stream"])
        self.saved_step = committed.step
        if restored.resharded_from is None:
            restore_rng(extra["rng"])
        else:
            # Another world size has other ranks: no saved stream is this rank's, so derive fresh ones.
            seed_everything(rank_seed(self.seed, self.rank, committed.step))
            log.info("resharded from %d to %d workers", restored.resharded_from, self.store.world_size)
        for reason in restored.skipped:
            log.warning("skipped a newer checkpoint: %s", reason)
        log.info("resumed from %s (step %d)", committed.url, committed.step)
        return committed.step, {
            "restored_step": committed.step,
            "restored_from": committed.url,
            "skipped": restored.skipped,
            "resharded_from": restored.resharded_from,
        }

    def save(self, step: int) -> list[str]:
        """Checkpoint step `step` (never twice); at the last step, wait for its upload. Returns URLs committed."""
        committed: list[str] = []
        if self.saved_step != step:  # never rewrite a committed checkpoint
            extra = {
                "step": step,
                "strategy": self.strategy.extra_state(),
                "stream": self.stream.state_dict(),
                "rng": capture_rng(),
            }
            started = time.perf_counter()
            committed = self.store.save(step, self.strategy, extra)
            log.info(
                "checkpoint step %d %s in %.2fs",
                step,
                "upload started" if self.store.async_upload else "committed",
                time.perf_counter() - started,
            )
            self.saved_step = step
        if step == self.last_step:
            committed += self.finish()
        return committed

    def finish(self) -> list[str]:
        """Wait for a background upload, so the run never ends with one pending; returns URLs committed."""
        committed = self.store.wait()
        self.store.close()
        return committed
