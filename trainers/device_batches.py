"""A stream's micro-batches on the training device, the next one already on its way while this one trains.

On a CUDA device each batch goes into pinned (page-locked) host memory and is copied with
non_blocking=True on a side stream, issued as soon as the batch before it is handed out: the copy
overlaps the step's compute and never blocks the host (a copy from pageable memory would). The step's
stream waits for that batch's copy alone (an event) and takes over its memory (`record_stream`), so
the caching allocator never hands it to the next copy while a kernel still reads it. On the CPU the
same one-batch read-ahead runs without pinning or streams: there is no copy to overlap.

A batch read ahead is not consumed: `state_dict()` is the stream's cursor before it, so a checkpoint
taken between steps resumes at the first batch the model has not trained on, as without read-ahead.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.batch import Batch
from data_pipeline.stream import TokenStream
from trainers.tasks import Task


class DeviceBatches:
    """Iterates a TokenStream's batches as the task reads them, on `device`, one batch read ahead."""

    def __init__(self, stream: TokenStream, task: Task, split: str, device: torch.device):
        self.stream, self.task, self.split, self.device = stream, task, split, device
        self._copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        # The batch read ahead (its tensors and the event its copy completes), and the cursor before it.
        self._ahead: tuple[Batch[torch.Tensor], torch.cuda.Event | None] | None = None
        self._cursor_before_ahead: dict | None = None

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Batch[torch.Tensor]:
        """The next micro-batch, ready to use on the device; the one after it starts on its way."""
        batch, copied = self._ahead if self._ahead is not None else self._issue()
        self._ahead = None  # handed out now, whether or not the next read succeeds
        self._cursor_before_ahead = self.stream.state_dict()
        self._ahead = self._issue()
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            batch.map(lambda tensor: tensor.record_stream(current))
        return batch

    def _issue(self) -> tuple[Batch[torch.Tensor], torch.cuda.Event | None]:
        """Read the stream's next batch, run the task's host-side work and start its copy to the device."""
        host = self.task.host_batch(next(self.stream), self.split)
        if self._copies is None:
            return host.map(torch.from_numpy), None
        with torch.cuda.stream(self._copies):
            batch = host.map(lambda array: pinned(array).to(self.device, non_blocking=True))
            copied = torch.cuda.Event()
            copied.record(self._copies)
        return batch, copied

    def state_dict(self) -> dict:
        """The stream's cursor after the batches handed out (a batch read ahead is not counted)."""
        if self._ahead is None or self._cursor_before_ahead is None:
            return self.stream.state_dict()
        return dict(self._cursor_before_ahead)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor (what was read ahead is dropped)."""
        self._ahead = self._cursor_before_ahead = None
        self.stream.load_state_dict(state)

    @property
    def epoch(self) -> int:
        """Full passes over the (first) dataset's split by the batches handed out."""
        return self.stream.epoch_at(int(self.state_dict()["position"]))

    def close(self) -> None:
        """Stop the stream's reading."""
        self._ahead = None
        self.stream.close()


def pinned(array: np.ndarray) -> torch.Tensor:
    """A host array as a tensor in pinned memory (the only kind a non_blocking copy to a GPU leaves the host free)."""
    return torch.from_numpy(array).pin_memory()
