"""Batch: one micro-batch of token sequences and, for fine-tuning data, what was stored beside them.

Pretraining data is tokens alone. `kiln prepare kind=chat` stores a per-token loss mask (1 = learn this
token: the assistant's replies and the final EOS), `kind=classification` one class id per sequence.
Every row also carries its position in the stream's global order (the same at any world size), which
seeds what a task draws per row (task=mlm's masks), so a resumed run draws exactly as an uninterrupted one,
and its example's index in its split (what a task looks up per example: DPO's reference log-probs).
A `kind=preference` example is a pair: its chosen row then its rejected row, side by side in one row of
2 * seq_len tokens.
The same container carries numpy arrays out of the `TokenStream` and tensors into a `Task`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

A = TypeVar("A")
B = TypeVar("B")

LOSS_MASK = "loss_mask"
LABELS = "labels"
FIELDS = (LOSS_MASK, LABELS)  # what a dataset may store besides tokens


@dataclass(frozen=True)
class Batch(Generic[A]):
    """Token ids (rows, L), L = seq_len or 2 * seq_len for pairs; a loss mask (rows, L, 1 = learn) or class ids
    (rows,) when stored; each row's global stream position and its example's index in its split (rows,), both
    set by the TokenStream."""

    tokens: A
    loss_mask: A | None = None
    labels: A | None = None
    positions: A | None = None
    indices: A | None = None
    # (rows, 2): each pair's reference log-probs (chosen, rejected), which task=dpo looks up by `indices`
    reference: A | None = None

    def map(self, fn: Callable[[A], B]) -> Batch[B]:
        """The same batch with fn applied to every array it holds (e.g. numpy -> tensor on a device)."""
        return Batch(
            fn(self.tokens),
            None if self.loss_mask is None else fn(self.loss_mask),
            None if self.labels is None else fn(self.labels),
            None if self.positions is None else fn(self.positions),
            None if self.indices is None else fn(self.indices),
            None if self.reference is None else fn(self.reference),
        )
