"""Which checkpoints to keep and which one to load: decisions over plain step numbers, no storage.

CheckpointStore (trainers/checkpoint/store.py) does the I/O around them: it lists the step folders, looks
for manifests, verifies checksums, and deletes or loads what these functions choose.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field


def retention(
    steps: Iterable[int], committed: Collection[int], *, keep_last: int, keep_every: int, pinned: int | None = None
) -> tuple[list[int], list[int]]:
    """(kept, deleted) step folders, newest first, of the folders at steps of which committed have a manifest.

    Kept: the newest keep_last committed ones (0: all of them), every committed multiple of keep_every
    (0: none), and pinned (the checkpoint just written). Everything else goes, uncommitted leftovers too.
    """
    ordered = sorted(set(steps), reverse=True)
    done = [step for step in ordered if step in committed]
    kept = set(done[:keep_last]) if keep_last else set(done)
    kept |= {step for step in done if keep_every and step % keep_every == 0}
    if pinned is not None:
        # Kept even when newer committed folders exist (a resume fell back past damaged ones).
        kept.add(pinned)
    return [step for step in ordered if step in kept], [step for step in ordered if step not in kept]


@dataclass(frozen=True)
class Choice:
    """The checkpoint to load (None: none verifies) and why each newer committed one was skipped."""

    step: int | None
    skipped: list[str] = field(default_factory=list)


def choose_checkpoint(verdicts: Iterable[tuple[int, str | None]]) -> Choice:
    """The first committed step, newest first, whose verification found no problem (None as the problem).

    verdicts may be lazy, verifying as it is drawn: nothing after the chosen step is drawn, so
    older checkpoints are never read once one verifies.
    """
    skipped: list[str] = []
    for step, problem in verdicts:
        if problem is None:
            return Choice(step, skipped)
        skipped.append(problem)
    return Choice(None, skipped)
