"""A checkpoint's shards as this package sees them: what it asks of the strategy that writes and reads
them, what a rank reports it wrote, and where DeepSpeed's files lie.

trainers/strategies/ fulfils these (its `Strategy` is a `CheckpointedStrategy`); this package never
imports a strategy, so the arrows point one way: strategies -> checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# {file name: (size, sha256)} of what one rank wrote into a shards folder.
FileRecords = dict[str, tuple[int, str]]

# The tag DeepSpeed saves a ZeRO checkpoint under: its files lie in shards/<tag>/.
CHECKPOINT_TAG = "zero"


class ShardIO(Protocol):
    """What the store asks of a strategy: write and read this rank's model and optimizer shards."""

    def save(self, shards_url: str) -> FileRecords:
        """Collective: write this rank's model and optimizer shards under shards_url; returns what it wrote."""

    def save_async(self, shards_url: str, group) -> Callable[[], FileRecords]:
        """Collective: capture the state now, write it in the background; finish() blocks until written."""

    def load(self, shards_url: str, saved_world_size: int | None = None) -> None:
        """Collective: read what save() wrote, in place, resharding from saved_world_size workers."""


class CheckpointedStrategy(ShardIO, Protocol):
    """What trainers/checkpoint/schedule.py asks of a strategy: its shards, and the state kept beside them."""

    def extra_state(self) -> dict:
        """State outside the shards that every rank holds identically (LR schedule, loss scaler)."""

    def load_extra_state(self, state: dict) -> None:
        """Restore what extra_state() returned."""
