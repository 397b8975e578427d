"""What a training loop needs from whoever launched it: its rank, a way to report, a stop signal."""

from __future__ import annotations

from typing import Protocol


class WorkerContext(Protocol):
    """The launcher's side of a worker (Ray Train or torchrun).

    Launchers may also set `launcher` (its name), `node` (where this rank runs, in words), `node_id`
    and `node_address` (the cluster's id and IP of that node, where it has them) and `stop_reason`
    (why should_stop() turned true); the loop records them in the run's events.
    """

    rank: int
    local_rank: int
    world_size: int

    def report(self, metrics: dict[str, float], step: int) -> None:
        """Hand the latest metrics to the launcher, at every step that logged metrics or committed a checkpoint.

        Every rank calls it at the same steps, so launchers may treat it as a collective. Checkpoints are
        not handed over: the CheckpointStore commits and logs them, and `finished` events name the newest.
        """

    def should_stop(self) -> bool:
        """True once the launcher asked this worker to stop early (preemption, `kiln stop`)."""
