"""Checkpoint speed on an S3-compatible store: async vs sync blocking, save/load vs raw s3fs, restart time.

    .venv/bin/python benchmarks/checkpoint.py [--quick] [--layers 8] [--width 512] [--skip-restart]

A module of `make bench` (benchmarks/suite.py): HEADING, measure(quick) and render(results). Starts
moto's S3 server on 127.0.0.1 (a free port; it shares the machine's CPUs with the writer) and stops it
at the end. Three measurements:

(d) Blocking time of one save of the same model + AdamW state, synchronous vs `checkpoint.async`
    (async blocks while DCP copies the state to CPU; the upload runs in the background).
(e) Save and load wall time (manifest and sha256 verification included) vs a raw s3fs copy of
    exactly the same files, both the way a user would write it (`put`/`get` of the folder with
    s3fs's defaults) and with the parallelism Kiln uses (as many files at once, the same part size
    and parts in flight). Rounds alternate which side goes first; the table gives medians.
(f) Time from SIGKILL of a Ray worker to the first step logged after Ray restarted the group from the
    last committed checkpoint (`kiln train`, 2 CPU workers, every step checkpointed).

Asserts nothing. Goals (issue 15): async blocks < 5% of sync; save and load >= 0.8 of raw; restart < 30 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, paragraph, today  # noqa: E402

HEADING = "## Checkpoints and restarts"

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


def raw_put_parallel(fs, local: str, url: str) -> None:
    """s3fs uploads of local's files with Kiln's parallelism: as many files at once, same parts in flight."""
    from data_pipeline import transfer
    from trainers.strategies.dcp_io import UPLOAD_THREADS

    names = sorted(
        os.path.relpath(os.path.join(folder, name), local) for folder, _, found in os.walk(local) for name in found
    )
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for _ in pool.map(
            lambda name: fs.put_file(
                f"{local}/{name}",
                f"{url}/{name}".removeprefix("s3://"),
                chunksize=transfer.STREAM_PART_BYTES,
                max_concurrency=transfer.STREAM_CONCURRENCY,
            ),
            names,
        ):
            pass


def raw_get_parallel(fs, url: str, local: str) -> None:
    """s3fs downloads of url's files with Kiln's parallelism (files at once, part size, parts in flight)."""
    from data_pipeline import storage, transfer

    files = list(storage.walk_files(url))
    os.makedirs(local, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:  # trainers/checkpoint/store.py verify(): 4 files at once
        for _ in pool.map(
            lambda item: fs.get_file(
                f"{url}/{item[0]}".removeprefix("s3://"),
                os.path.join(local, item[0].replace("/", "_")),
                chunksize=transfer.part_size(item[1]),
                max_concurrency=transfer.PART_CONCURRENCY,
            ),
            files,
        ):
            pass


def save_and_load(root: str, layers: int, width: int, rounds: int) -> dict:
    """Measurements (d) and (e), in one process with a one-rank gloo group; seconds of every round."""
    import s3fs
    import torch.distributed as dist

    from data_pipeline import storage
    from trainers.checkpoint.store import CheckpointStore

    store_file = tempfile.mktemp(prefix="kiln-bench-pg-")
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)
    strategy = build_strategy(layers, width)
    extra = {"step": 1, "strategy": strategy.extra_state()}

    def store(name: str, async_upload: bool = False) -> CheckpointStore:
        return CheckpointStore(
            f"{root}/{name}", rank=0, world_size=1, strategy="ddp", config_hash="bench", async_upload=async_upload
        )

    warmup = store("warmup")
    warmup.save(1, strategy, extra)  # first-use costs (s3fs client, DCP planner) untimed
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    source = tempfile.mkdtemp(prefix="kiln-bench-raw-")  # the very bytes of a checkpoint, for the raw copies
    fs.get(f"{warmup.url(1)}/".removeprefix("s3://"), source, recursive=True)
    size = sum(size for _, size in storage.walk_files(warmup.url(1)))
    files = sum(len(names) for _, _, names in os.walk(source))
    storage.remove(warmup.url(1), recursive=True)
    keys = ["sync", "async_block", "async_finish", "put", "put_parallel", "load", "get", "get_parallel"]
    times: dict[str, list[float]] = {key: [] for key in keys}
    try:
        for number in range(rounds):
            sync = store(f"sync{number}")
            asynchronous = store(f"async{number}", async_upload=True)

            def kiln_save(sync=sync, asynchronous=asynchronous) -> None:
                times["sync"].append(timed(lambda: sync.save(1, strategy, extra))[0])
                times["async_block"].append(timed(lambda: asynchronous.save(1, strategy, extra))[0])
                times["async_finish"].append(timed(asynchronous.wait)[0])
                asynchronous.close()

            def raw_save(number=number) -> None:
                times["put"].append(
                    timed(lambda: fs.put(f"{source}/", f"{root}/raw{number}/".removeprefix("s3://"), recursive=True))[0]
                )
                times["put_parallel"].append(timed(lambda: raw_put_parallel(fs, source, f"{root}/rawp{number}"))[0])

            def kiln_load(sync=sync) -> None:
                took, restored = timed(lambda: sync.restore(strategy))
                assert restored is not None and restored.committed.step == 1
                times["load"].append(took)

            def raw_load(sync=sync) -> None:
                for key, copy in (
                    ("get", lambda to: fs.get(f"{sync.url(1)}/".removeprefix("s3://"), to, recursive=True)),
                    ("get_parallel", lambda to: raw_get_parallel(fs, sync.url(1), to)),
                ):
                    target = tempfile.mkdtemp(prefix="kiln-bench-get-")
                    times[key].append(timed(lambda copy=copy, target=target: copy(target))[0])
                    shutil.rmtree(target, ignore_errors=True)

            # alternate which side goes first, so neither always meets a warmer (or busier) server
            steps = (
                [kiln_save, raw_save, kiln_load, raw_load]
                if number % 2 == 0
                else [raw_save, kiln_save, raw_load, kiln_load]
            )
            for step in steps:
                step()
            for name in (f"sync{number}", f"async{number}", f"raw{number}", f"rawp{number}"):
                storage.remove(f"{root}/{name}", recursive=True)  # moto holds objects in memory
    finally:
        shutil.rmtree(source, ignore_errors=True)
        dist.destroy_process_group()
    return {
        "bytes": size,
        "files": files,
        "rounds": times,
        **{key: statistics.median(values) for key, values in times.items()},
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


def measure(quick: bool, layers: int | None = None, width: int | None = None, restart: bool | None = None) -> dict:
    """Run (d), (e) and, unless quick, (f); quick: a 2x256 model and one round (a smoke run)."""
    layers = layers or (2 if quick else 8)
    width = width or (256 if quick else 512)
    os.environ.setdefault("KILN_CACHE_DIR", os.path.expanduser("~/.cache/kiln"))
    from tests.s3_server import stop

    server, root = start_s3()
    try:
        io = save_and_load(root, layers, width, rounds=1 if quick else 5)
        kill = restart_time(root) if (not quick if restart is None else restart) else None
    finally:
        stop(server)
    return {
        "date": today(),
        "machine": machine(),
        "model": f"GPT-2 {layers}x{width}",
        "quick": quick,
        **io,
        "restart": kill,
    }


def render(results: dict) -> str:
    """The section's markdown: (d) and (e) in one table, (f) in another, and how they were measured."""
    from data_pipeline import transfer
    from trainers.checkpoint.store import restore_copy
    from trainers.strategies.dcp_io import UPLOAD_THREADS

    r = results
    mib = r["bytes"] / 2**20
    rounds = len(r["rounds"]["sync"])
    where = f"{r['date']} | {r['machine']}"
    lines = [
        paragraph(
            f"One process (gloo group of 1), {r['model']} under DDP after one AdamW step: model + optimizer state = "
            f"{mib:,.1f} MiB, saved to and loaded from moto's S3 server on 127.0.0.1, which runs on the same CPUs "
            'as the writer (so every byte costs CPU on both sides). "Save" is `CheckpointStore.save` with the '
            f"manifest (sizes, sha256 of every file) committed: DCP writes the state as {UPLOAD_THREADS} files at "
            f"once, hashing as it writes; a file under {transfer.SINGLE_PUT_PARTS * transfer.STREAM_PART_BYTES >> 20} "
            f"MiB goes as one PUT (s3fs's rule), a larger one as {transfer.STREAM_PART_BYTES >> 20} MiB parts that "
            'upload threads send while DCP serialises the next; "load" is `restore`: rank 0 downloads every file '
            "as parallel ranged reads, hashing them in order, into memory (a local folder when the copy would take "
            f'over {restore_copy.MEMORY_SHARE:.0%} of free memory), then DCP loads from that copy. "Raw" is s3fs '
            "copying exactly the same files to local disk: once as a user would (`put`/`get` of the folder, "
            "s3fs's defaults: 50 MiB parts, 10 in flight), once with Kiln's parallelism (as many files at once, its "
            "part size and "
            f"parts in flight). Medians of {rounds} round(s) that alternate which side goes first; ratio = raw "
            "time / Kiln time (>= 0.8 is the goal), against the default raw copy and the parallel one."
        ),
        "",
        "| date | machine | sync save | async save blocks | raw put (defaults / parallel) | save ratio | load "
        "| raw get (defaults / parallel) | load ratio |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {where} | {r['sync']:.2f} s ({mib / r['sync']:.0f} MiB/s) "
        f"| {r['async_block']:.2f} s ({r['async_block'] / r['sync']:.1%} of sync; goal < 5%) "
        f"| {r['put']:.2f} s / {r['put_parallel']:.2f} s "
        f"| {r['put'] / r['sync']:.2f} / {r['put_parallel'] / r['sync']:.2f} "
        f"| {r['load']:.2f} s ({mib / r['load']:.0f} MiB/s) | {r['get']:.2f} s / {r['get_parallel']:.2f} s "
        f"| {r['get'] / r['load']:.2f} / {r['get_parallel'] / r['load']:.2f} |",
    ]
    if r.get("restart"):
        k = r["restart"]
        lines += [
            "",
            paragraph(
                "Restart: `kiln train` on 2 Ray CPU workers, every step checkpointed to the same S3 server, rank 1 "
                "SIGKILLed after step 10 was committed; seconds from the kill until Ray Train had restarted the "
                f"group (restored step {k['restored_step']}) and until the first step after it was logged "
                "(goal < 30 s)."
            ),
            "",
            "| date | machine | kill -> group restarted | kill -> first step logged |",
            "|---|---|---|---|",
            f"| {where} | {k['kill_to_group_started_s']:.1f} s | {k['kill_to_first_step_s']:.1f} s |",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, one round, no restart")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--skip-restart", action="store_true", help="only measurements (d) and (e)")
    args = parser.parse_args()
    results = measure(args.quick, args.layers, args.width, restart=False if args.skip_restart else None)
    print(render(results))


if __name__ == "__main__":
    main()
