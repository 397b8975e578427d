"""TokenStream: each worker's exact share of a deterministic global order of sequences.

The global order of a split is a permutation of its sequences seeded by (seed, epoch); position p of
the stream is sequence ``perm(p // N)[p % N]``. Each call hands rank r the micro-batch at positions
``[cursor + r*b, cursor + (r+1)*b)`` and advances the cursor by ``world_size * b`` for everyone, so the
cursor alone says what has been consumed, whatever the world size. Resuming with a different number of
workers continues from the same global position: nothing skipped, nothing repeated.
"""

from __future__ import annotations

import bisect
import queue
import threading
from typing import Iterator, Optional

import numpy as np

from data_pipeline import storage
from data_pipeline.dataset import Dataset


class TokenStream:
    """Deterministic, resumable, sharded batches of token sequences."""

    def __init__(self, dataset: Dataset, split: str, *, rank: int, world_size: int, micro_batch: int,
                 seed: int, shuffle: bool = True, prefetch: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset, self.split = dataset, split
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.seed, self.shuffle = seed, shuffle
        self.shards = dataset.shards(split)
        self._starts = np.cumsum([0] + [s.sequences for s in self.shards]).tolist()
        self.num_sequences = self._starts[-1]
        if self.num_sequences == 0:
            raise ValueError(f"split {split!r} of {dataset.url} holds no whole sequence of "
                             f"{dataset.seq_len} tokens")
        self.position = 0  # global: sequences consumed by all ranks together
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._handles: dict[int, object] = {}
        self.prefetch = prefetch  # batches a background thread reads ahead (0: read on demand)
        self._ahead: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._reader: Optional[threading.Thread] = None

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        """This rank's next micro-batch, shape (micro_batch, seq_len), int64."""
        if self.prefetch:
            if self._reader is None:
                self._start_reader()
            position, batch = self._ahead.get()
            if isinstance(batch, BaseException):
                raise batch
            assert position == self.position
        else:
            batch = self._batch_at(self.position)
        self.position += self.world_size * self.micro_batch
        return batch

    def _batch_at(self, position: int) -> np.ndarray:
        first = position + self.rank * self.micro_batch
        return np.stack([self._read(self._sequence_at(p)) for p in range(first, first + self.micro_batch)])

    def _start_reader(self) -> None:
        self._ahead, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        self._reader = threading.Thread(target=self._read_ahead, args=(self.position,), daemon=True,
                                        name=f"token-stream-{self.split}")
        self._reader.start()

    def _read_ahead(self, position: int) -> None:
        while not self._stop.is_set():
            try:
                item = (position, self._batch_at(position))
            except BaseException as exc:  # surfaced to the consumer on its next call
                item = (position, exc)
            while not self._stop.is_set():
                try:
                    self._ahead.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            position += self.world_size * self.micro_batch

    def _stop_reader(self) -> None:
        if self._reader is not None:
            self._stop.set()
            self._reader.join()
            self._reader, self._ahead = None, None

    @property
    def epoch(self) -> int:
        """How many full passes over the split the stream has completed."""
        return self.position // self.num_sequences

    def state_dict(self) -> dict:
        """The global cursor (valid for any world size) and what it is a cursor into."""
        return {"position": self.position, "seed": self.seed, "split": self.split,
                "num_sequences": self.num_sequences, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor; the dataset and seed must be the ones it was saved with."""
        for key in ("seed", "split", "num_sequences", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data stream state was saved with {key}={state[key]!r} but this run has "
                                 f"{getattr(self, key)!r}: resume with the same dataset and train.seed")
        self._stop_reader()  # batches read ahead belong to the old position
        self.position = int(state["position"])

    def close(self) -> None:
        """Stop reading ahead and close open shard files."""
        self._stop_reader()
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _sequence_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_sequences)
        if epoch != self._order_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = rng.permutation(self.num_sequences)
            else:
                self._order = np.arange(self.num_sequences)
            self._order_epoch = epoch
        return int(self._order[offset])

    def _read(self, index: int) -> np.ndarray:
        shard_no = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard_no]
        seq_bytes = self.dataset.seq_len * self.dataset.dtype.itemsize
        handle = self._handles.get(shard_no)
        if handle is None:
            fs, path = storage.filesystem(self.shards[shard_no].url)
            handle = self._handles[shard_no] = fs.open(path, "rb")
        handle.seek(local * seq_bytes)
        data = handle.read(seq_bytes)
        return np.frombuffer(data, dtype=self.dataset.dtype).astype(np.int64)
