"""Checkpoint speed on an S3-compatible store: async vs sync blocking, throughput vs raw s3fs, restart time.

    .venv/bin/python benchmarks/checkpoint.py [--layers 8] [--width 512]

Starts moto's S3 server on 127.0.0.1 (a free port) and stops it at the end. Three measurements:

1. Blocking time of one save of the same model + AdamW state, synchronous vs `checkpoint.async`
   (async blocks while DCP copies the state to CPU; the upload runs in the background).
2. Save and load throughput (checkpoint bytes / wall time, manifest and sha256 verification included)
   vs raw s3fs copying the very same files (`put`/`get` of the folder).
3. Time from SIGKILL of a Ray worker to the first step logged after Ray restarted the group from the
   last committed checkpoint (`kiln train`, 2 CPU workers, every step checkpointed).

Prints results; asserts nothing. Goals (issue 6): async blocks < 10% of sync; throughput ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUCKET = "kiln-bench"


def start_s3() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free loopback port, with the AWS variables pointing at it."""
    import s3fs

    from tests.s3_server import aws_env, start_moto

    server, endpoint = start_moto()
    os.environ.update(aws_env(endpoint))
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    return server, f"s3://{BUCKET}"


def build_strategy(layers: int, width: int):
    """A GPT-2 of the given size under DDP (one process), with one optimizer step taken (Adam state exists)."""
    import torch

    from trainers.config import ModelConfig, OptimConfig, StrategyConfig
    from trainers.models import build_gpt2
    from trainers.strategies.ddp import DDPStrategy

    torch.manual_seed(0)
    model = build_gpt2(ModelConfig(n_layer=layers, n_head=8, n_embd=width, n_positions=256), vocab_size=8192, eos_id=0)
    strategy = DDPStrategy(StrategyConfig(precision="fp32"), torch.device("cpu"))
    strategy.wrap(model, OptimConfig(warmup_steps=0), max_steps=10, micro_batch=1, grad_accum=1)
    tokens = torch.randint(0, 8192, (1, 64))
    strategy.model(input_ids=tokens, labels=tokens).loss.backward()
    strategy.step()
    return strategy


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def save_and_load(root: str, layers: int, width: int) -> dict:
    """Measurements 1 and 2, in one process with a one-rank gloo group."""
    import s3fs
    import torch.distributed as dist

    from data_pipeline import storage
    from trainers.checkpoint import CheckpointStore

    store_file = tempfile.mktemp(prefix="kiln-bench-pg-")
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)
    strategy = build_strategy(layers, width)
    extra = {"step": 1, "strategy": strategy.extra_state()}

    def store(name: str, async_upload: bool) -> CheckpointStore:
        return CheckpointStore(
            f"{root}/{name}", rank=0, world_size=1, strategy="ddp", config_hash="bench", async_upload=async_upload
        )

    store("warmup", False).save(1, strategy, extra)  # first-use costs (s3fs client, DCP planner) untimed
    sync = store("sync", False)
    sync_s, _ = timed(lambda: sync.save(1, strategy, extra))
    asynchronous = store("async", True)
    async_block_s, _ = timed(lambda: asynchronous.save(1, strategy, extra))
    async_finish_s, _ = timed(asynchronous.wait)
    asynchronous.close()

    size = sum(size for _, size in storage.walk_files(sync.url(1)))
    load_s, restored = timed(lambda: sync.restore(strategy))
    assert restored is not None and restored.committed.step == 1

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    local = tempfile.mkdtemp(prefix="kiln-bench-raw-")
    try:
        raw_get_s, _ = timed(lambda: fs.get(f"{sync.url(1)}/".removeprefix("s3://"), local, recursive=True))
        raw_put_s, _ = timed(lambda: fs.put(f"{local}/", f"{root}/raw/".removeprefix("s3://"), recursive=True))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    dist.destroy_process_group()
    return {
        "bytes": size,
        "sync_s": sync_s,
        "async_block_s": async_block_s,
        "async_finish_s": async_finish_s,
        "load_s": load_s,
        "raw_put_s": raw_put_s,
        "raw_get_s": raw_get_s,
    }


def restart_time(root: str) -> dict:
    """Measurement 3: SIGKILL rank 1 of a running `kiln train`, time until a step is logged again."""
    from tests.helpers import TINY
    from tests.integration.ft_harness import committed_steps, events, finish, metrics, start_kiln, wait_for, worker_pid

    log = Path(tempfile.mkdtemp(prefix="kiln-bench-")) / "train.log"
    run = start_kiln(
        "train",
        *TINY,
        "tracker=none",
        "train.max_steps=30",
        "train.checkpoint_every=1",
        "checkpoint.keep_last=2",
        "run.id=restart",
        f"storage.root={root}/runs",
        log=log,
    )
    wait_for("step 10 committed", lambda: max(committed_steps(f"{root}/runs", "restart"), default=0) >= 10, proc=run)
    os.kill(worker_pid(f"{root}/runs", "restart", rank=1), signal.SIGKILL)
    killed = time.time()
    if finish(run) != 0:
        raise RuntimeError(log.read_text()[-3000:])
    started = events(f"{root}/runs", "restart", "started")[-1]
    rows = metrics(f"{root}/runs", "restart")
    first_after = min(r["time"] for r in rows if "train/loss" in r and r["time"] > killed)
    return {
        "kill_to_group_started_s": started["time"] - killed,
        "kill_to_first_step_s": first_after - killed,
        "restored_step": started["restored_step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--skip-restart", action="store_true", help="only measurements 1 and 2")
    args = parser.parse_args()
    os.environ.setdefault("KILN_CACHE_DIR", os.path.expanduser("~/.cache/kiln"))
    from tests.s3_server import stop

    server, root = start_s3()
    try:
        io = save_and_load(root, args.layers, args.width)
        restart = None if args.skip_restart else restart_time(root)
    finally:
        stop(server)
    mb = io["bytes"] / 2**20
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"checkpoint: GPT-2 {args.layers}x{args.width}, model + AdamW state = {mb:,.1f} MiB on moto S3 (loopback)")
    print(f"sync save blocks     {io['sync_s']:7.2f} s   ({mb / io['sync_s']:6.1f} MiB/s, manifest + sha256 included)")
    print(
        f"async save blocks    {io['async_block_s']:7.2f} s   = {io['async_block_s'] / io['sync_s']:.1%} of sync "
        f"(goal < 10%); upload finished {io['async_finish_s']:.2f} s later"
    )
    print(
        f"raw s3fs put         {io['raw_put_s']:7.2f} s   ({mb / io['raw_put_s']:6.1f} MiB/s) -> save ratio "
        f"{io['raw_put_s'] / io['sync_s']:.2f} (goal >= 0.8)"
    )
    print(f"load (verify+DCP)    {io['load_s']:7.2f} s   ({mb / io['load_s']:6.1f} MiB/s)")
    print(
        f"raw s3fs get         {io['raw_get_s']:7.2f} s   ({mb / io['raw_get_s']:6.1f} MiB/s) -> load ratio "
        f"{io['raw_get_s'] / io['load_s']:.2f} (goal >= 0.8)"
    )
    if restart:
        print(
            f"worker SIGKILL -> group restarted (restored step {restart['restored_step']}) "
            f"{restart['kill_to_group_started_s']:.1f} s -> first step logged {restart['kill_to_first_step_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
