"""A bare torch DDP loop, no Kiln: the baseline of benchmarks/throughput.py.

    torchrun --standalone --nproc-per-node 2 benchmarks/bare_ddp.py SPEC.json OUT.json

SPEC.json (written by benchmarks/throughput.py from the quickstart's composed config) names the prepared
dataset folder, the GPT-2 shape, the batch, the optimizer's settings and the number of steps. The loop
reads the train shards straight into memory with numpy, then runs what a hand-written DDP script runs:
forward, backward, clip, AdamW (decay on matrices only), warmup + cosine LR, zero_grad. Rank 0 writes
time.time() at the end of every step (after reading the loss back) to OUT.json; nothing else is timed here.
benchmarks/ray_train_plain.py runs main() in Ray Train's workers, which arrive with the process group made.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2Config, GPT2LMHeadModel


def train_sequences(dataset_dir: str) -> np.ndarray:
    """Every whole sequence of the dataset's train split, (n, seq_len), in shard order."""
    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    seq_len = manifest["seq_len"]
    parts = []
    for shard in manifest["splits"]["train"]["shards"]:
        tokens = np.fromfile(Path(dataset_dir) / shard["path"], dtype=manifest["dtype"])
        parts.append(tokens[: len(tokens) // seq_len * seq_len].reshape(-1, seq_len))
    return np.concatenate(parts)


def lr_lambda(spec: dict):
    """Linear warmup, then cosine decay to min_lr_ratio at the last step (the quickstart's schedule)."""
    warmup, steps, floor = spec["warmup_steps"], spec["steps"], spec["min_lr_ratio"]

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build(spec: dict) -> tuple[DistributedDataParallel, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The DDP-wrapped GPT-2, AdamW (decay on matrices only) and warmup + cosine schedule of the spec."""
    model = DistributedDataParallel(GPT2LMHeadModel(GPT2Config(**spec["model"])))
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": spec["weight_decay"]}, {"params": vectors, "weight_decay": 0.0}],
        lr=spec["lr"],
        betas=tuple(spec["betas"]),
        eps=spec["eps"],
    )
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec))


def micro_batch(sequences: np.ndarray, order: np.ndarray, index: int, micro: int) -> torch.Tensor:
    """The micro-batch at position index of the run's shuffled order (all ranks' micro-batches interleaved)."""
    first = (index * micro) % (len(order) - micro)
    return torch.from_numpy(sequences[order[first : first + micro]].astype(np.int64))


def train_step(model, optimizer, scheduler, batches: list[torch.Tensor], grad_clip: float) -> float:
    """One optimizer step over the micro-batches (gradients synced on the last); the last one's loss."""
    for k, batch in enumerate(batches):
        if k < len(batches) - 1:
            with model.no_sync():
                (model(input_ids=batch, labels=batch).loss / len(batches)).backward()
        else:
            loss = model(input_ids=batch, labels=batch).loss
            (loss / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main(spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    owned = not dist.is_initialized()  # torchrun's processes make the group; Ray Train's already have it
    if owned:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    sequences = train_sequences(spec["dataset"])
    order = np.random.default_rng(spec["seed"]).permutation(len(sequences))
    model, optimizer, scheduler = build(spec)
    micro = spec["micro_batch"]
    accum = spec["global_batch"] // (micro * world)
    stamps = []
    for step in range(spec["steps"]):
        batches = [micro_batch(sequences, order, (step * accum + k) * world + rank, micro) for k in range(accum)]
        train_step(model, optimizer, scheduler, batches, spec["grad_clip"])
        stamps.append(time.time())
    if rank == 0:
        Path(out).write_text(json.dumps({"step_end": {str(s + 1): t for s, t in enumerate(stamps)}}))
    if owned:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
