"""TokenStream: each worker's exact share of a deterministic global order of sequences.

The global order of a split is a permutation of its sequences seeded by (seed, epoch); position p of
the stream is sequence ``perm(p // N)[p % N]``. Each call hands rank r the micro-batch at positions
``[cursor + r*b, cursor + (r+1)*b)`` and advances the cursor by ``world_size * b`` for everyone, so the
cursor alone says what has been consumed, whatever the world size. Resuming with a different number of
workers continues from the same global position: nothing skipped, nothing repeated.

A mixture of datasets keeps that property: a seeded pattern of PERIOD slots, each dataset getting a
share of slots proportional to its weight, says which dataset global position p draws from, and the
dataset's own position is how many earlier positions drew from it: a closed form, so any cursor maps
to every dataset's cursor without replaying the stream.

Each position yields a `Batch` row: its global position, the sequence's index in its split, its tokens and, for
fine-tuning data, its stored loss mask (chat, preference) or class id (classification), read from the files
beside the shard at the same index, so the cursor that resumes the tokens resumes them too.

A "sequence" here is one stored example: seq_len tokens, or for `kind=preference` a pair, its chosen and its
rejected row together (2 * seq_len). Pairs are therefore what is shuffled, split across ranks and counted by the
cursor, and a pair's rows are never apart.
"""

from __future__ import annotations

import bisect
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np

from data_pipeline import storage
from data_pipeline.batch import LABELS, LOSS_MASK, Batch
from data_pipeline.dataset import Dataset

PERIOD = 1000  # mixture slots per pattern repetition: weights are honoured to 0.1%
LABEL_DTYPE = np.dtype("<i4")

# One sequence: its tokens (int64), loss mask (uint8), class id (those two None unless stored) and its index in
# its split.
Row = tuple[np.ndarray, np.ndarray | None, int | None, int]


class SplitReader:
    """One split of one dataset: the seeded order of its sequences and lazy range reads of them."""

    def __init__(self, dataset: Dataset, split: str, seed: int, shuffle: bool):
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.shards = dataset.shards(split)
        self.fields = dataset.fields
        self._starts = np.cumsum([0] + [s.sequences for s in self.shards]).tolist()
        self.num_sequences = self._starts[-1]
        if self.num_sequences == 0:
            raise ValueError(f"split {split!r} of {dataset.url} holds no whole sequence of {dataset.seq_len} tokens")
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)
        self._handles: dict[str, BinaryIO] = {}  # by file URL

    def sequence(self, position: int) -> Row:
        """The sequence at this reader's own position (epochs reshuffle): int64 tokens, mask, class id, index."""
        epoch, offset = divmod(position, self.num_sequences)
        if epoch != self._order_epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            else:
                self._order = np.arange(self.num_sequences)
            self._order_epoch = epoch
        return self._read(int(self._order[offset]))

    def close(self) -> None:
        """Close open shard files."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _read(self, index: int) -> Row:
        shard_no = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard_no]
        shard, length = self.shards[shard_no], self.dataset.example_tokens
        tokens = np.frombuffer(self._range(shard.url, local, length, self.dataset.dtype), self.dataset.dtype)
        mask: np.ndarray | None = None
        label: int | None = None
        if shard.mask_url and LOSS_MASK in self.fields:
            mask = np.frombuffer(self._range(shard.mask_url, local, length, np.dtype(np.uint8)), np.uint8)
        if shard.labels_url and LABELS in self.fields:
            label = int(np.frombuffer(self._range(shard.labels_url, local, 1, LABEL_DTYPE), LABEL_DTYPE)[0])
        return tokens.astype(np.int64), mask, label, index

    def _range(self, url: str, item: int, items: int, dtype: np.dtype) -> bytes:
        """The bytes of item number `item` (of `items` values each) of one of a shard's files."""
        handle = self._handles.get(url)
        if handle is None:  # opened on first use; object stores serve just the ranges read
            fs, path = storage.filesystem(url)
            handle = self._handles[url] = fs.open(path, "rb")
        size = items * dtype.itemsize
        handle.seek(item * size)
        data = handle.read(size)
        if len(data) != size:
            raise ValueError(f"{url} ends early: sequence {item} needs {size} bytes at offset {item * size}")
        return data


def mixture_pattern(weights: Sequence[float], seed: int) -> np.ndarray:
    """PERIOD slots, dataset i holding round(w_i / sum(w) * PERIOD) of them (largest remainder), shuffled."""
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * PERIOD
    counts = np.floor(shares).astype(np.int64)
    for i in np.argsort(-(shares - counts), kind="stable")[: PERIOD - counts.sum()]:
        counts[i] += 1
    slots = np.repeat(np.arange(len(weights)), counts)
    return np.random.default_rng([seed, 7919]).permutation(slots)


class TokenStream:
    """Deterministic, resumable, sharded batches of token sequences from one dataset or a weighted mix."""

    def __init__(
        self,
        dataset: Dataset | Sequence[Dataset],
        split: str,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        seed: int,
        shuffle: bool = True,
        prefetch: int = 0,
        weights: Sequence[float] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        datasets = [dataset] if isinstance(dataset, Dataset) else list(dataset)
        weights = list(weights) if weights is not None else [1.0] * len(datasets)
        if len(weights) != len(datasets) or min(weights) <= 0:
            raise ValueError("a mixture needs one positive weight per dataset")
        self.split, self.seed, self.shuffle, self.weights = split, seed, shuffle, weights
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.readers = [SplitReader(d, split, seed + 104729 * i, shuffle) for i, d in enumerate(datasets)]
        self.fields = self.readers[0].fields  # what each Batch carries besides tokens
        if any(r.fields != self.fields for r in self.readers):
            raise ValueError("a mixture's datasets must store the same fields (prepare them with the same kind=)")
        self.num_sequences = sum(r.num_sequences for r in self.readers)
        self._pattern = mixture_pattern(weights, seed)
        self._slots_before = np.stack(
            [np.concatenate([[0], np.cumsum(self._pattern == i)]) for i in range(len(datasets))]
        )
        self.position = 0  # global: sequences consumed by all ranks together
        self.prefetch = prefetch  # batches a background thread reads ahead (0: read on demand)
        self._ahead: queue.Queue[tuple[int, Batch[np.ndarray] | BaseException]] | None = None
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def dataset(self) -> Dataset:
        """The (first) dataset: its tokenizer and sequence length describe the whole stream."""
        return self.readers[0].dataset

    def __iter__(self) -> Iterator[Batch[np.ndarray]]:
        return self

    def __next__(self) -> Batch[np.ndarray]:
        """This rank's next micro-batch: int64 tokens (micro_batch, example tokens), and its mask or labels if
        stored."""
        if self.prefetch:
            if self._reader is None:
                self._start_reader()
            ahead = self._ahead
            if ahead is None:  # _start_reader sets it, _stop_reader clears it with the thread
                raise RuntimeError("token stream: read-ahead thread has no queue")
            position, batch = ahead.get()
            if isinstance(batch, BaseException):
                raise batch
            assert position == self.position
        else:
            batch = self._batch_at(self.position)
        self.position += self.world_size * self.micro_batch
        return batch

    @property
    def epoch(self) -> int:
        """Full passes over the (first) dataset's split so far."""
        return self.epoch_at(self.position)

    def epoch_at(self, position: int) -> int:
        """Full passes over the (first) dataset's split by the first `position` global sequences."""
        return self.source_positions(position)[0] // self.readers[0].num_sequences

    def source_positions(self, position: int) -> list[int]:
        """How many of the first `position` global sequences each dataset supplied."""
        periods, offset = divmod(position, PERIOD)
        return [int(periods * row[-1] + row[offset]) for row in self._slots_before]

    def state_dict(self) -> dict:
        """The global cursor (valid for any world size) and what it is a cursor into."""
        return {
            "position": self.position,
            "seed": self.seed,
            "split": self.split,
            "num_sequences": self.num_sequences,
            "shuffle": self.shuffle,
            "weights": self.weights,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor; the datasets, weights and seed must be the ones it was saved with."""
        for key in ("seed", "split", "num_sequences", "shuffle", "weights"):
            saved = state.get(key, [1.0] if key == "weights" else None)
            if saved != getattr(self, key):
                raise ValueError(
                    f"data stream state was saved with {key}={saved!r} but this run has "
                    f"{getattr(self, key)!r}: resume with the same data and train.seed"
                )
        self._stop_reader()  # batches read ahead belong to the old position
        self.position = int(state["position"])

    def close(self) -> None:
        """Stop reading ahead and close open shard files."""
        self._stop_reader()
        for reader in self.readers:
            reader.close()

    def _sequence_at(self, position: int) -> Row:
        source = int(self._pattern[position % PERIOD])
        return self.readers[source].sequence(self.source_positions(position)[source])

    def _batch_at(self, position: int) -> Batch[np.ndarray]:
        first = position + self.rank * self.micro_batch
        rows = [self._sequence_at(p) for p in range(first, first + self.micro_batch)]
        tokens = np.stack([row[0] for row in rows])
        positions = np.arange(first, first + self.micro_batch, dtype=np.int64)
        indices = np.asarray([row[3] for row in rows], dtype=np.int64)
        if not self.fields:  # pretraining data: tokens only
            return Batch(tokens, positions=positions, indices=indices)
        masks = [row[1] for row in rows if row[1] is not None]  # every row has one when the field is stored
        labels = [row[2] for row in rows]
        return Batch(
            tokens,
            loss_mask=np.stack(masks) if LOSS_MASK in self.fields else None,
            labels=np.asarray(labels, dtype=np.int64) if LABELS in self.fields else None,
            positions=positions,
            indices=indices,
        )

    def _start_reader(self) -> None:
        self._ahead, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        self._reader = threading.Thread(
            target=self._read_ahead, args=(self.position,), daemon=True, name=f"token-stream-{self.split}"
        )
        self._reader.start()

    def _read_ahead(self, position: int) -> None:
        ahead = self._ahead  # set before this thread starts, cleared only after it is joined
        if ahead is None:
            raise RuntimeError("token stream: read-ahead thread started without its queue")
        while not self._stop.is_set():
            item: tuple[int, Batch[np.ndarray] | BaseException]
            try:
                item = (position, self._batch_at(position))
            except BaseException as exc:  # surfaced to the consumer on its next call
                item = (position, exc)
            while not self._stop.is_set():
                try:
                    ahead.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            position += self.world_size * self.micro_batch

    def _stop_reader(self) -> None:
        if self._reader is not None:
            self._stop.set()
            self._reader.join()
            self._reader, self._ahead = None, None
