"""A bare torch DDP loop, no Kiln: the baseline Kiln's overhead is measured against.

    torchrun --standalone --nproc-per-node 2 benchmarks/bare_ddp.py DATASET_DIR STEPS OUT.json [FIRST_STEP]

Same model (GPT-2 from GPT2Config, the quickstart's shape), same prepared data (read straight from
the shard files with numpy), same batch (8 sequences x 2 workers), AdamW, one thread per worker.
With FIRST_STEP, rank 0 writes the time.time() at which its first step ended there (benchmarks/startup.py).
benchmarks/ray_train_plain.py runs main() in Ray Train's workers, which arrive with the process group made.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2Config, GPT2LMHeadModel


def main(dataset_dir: str, steps: int, out: str, micro_batch: int = 8, first_step: str | None = None) -> None:
    owned = not dist.is_initialized()  # torchrun's processes make the group; Ray Train's already have it
    if owned:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    seq_len = manifest["seq_len"]
    tokens = np.concatenate(
        [
            np.fromfile(Path(dataset_dir) / s["path"], dtype=manifest["dtype"])
            for s in manifest["splits"]["train"]["shards"]
        ]
    )
    sequences = tokens[: len(tokens) // seq_len * seq_len].reshape(-1, seq_len)
    order = np.random.default_rng(0).permutation(len(sequences))
    vocab = -(-manifest["vocab_size"] // 64) * 64
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=256,
        n_embd=128,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    model = DistributedDataParallel(GPT2LMHeadModel(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    times = []
    for step in range(steps):
        started = time.perf_counter()
        first = (step * world + rank) * micro_batch
        batch = torch.from_numpy(sequences[order[first : first + micro_batch]].astype(np.int64))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)
        times.append(time.perf_counter() - started)
        if step == 0 and rank == 0 and first_step:
            Path(first_step).write_text(repr(time.time()))
    steady = times[len(times) // 5 :]
    tokens_per_s = world * micro_batch * seq_len / statistics.median(steady)
    if rank == 0:
        Path(out).write_text(json.dumps({"tokens_per_s": tokens_per_s, "steps": steps}))
    if owned:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], first_step=sys.argv[4] if len(sys.argv) > 4 else None)
