"""Shared fixtures: a small cached stdlib corpus, isolated storage roots, offline W&B."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.s3_server import aws_env, start_moto, stop

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Small enough for seconds per run on 2 CPU cores, big enough that loss visibly falls.
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.n_positions=64",
    "data.seq_len=64",
    "data.vocab_size=512",
    "data.max_files=60",
    "train.global_batch=8",
    "train.micro_batch=4",
    "train.eval_batches=2",
    "optim.warmup_steps=2",
]


# The reference run of each strategy: 2 workers, fp32, dropout on (so RNG restore matters).
STRATEGY_RUN = [
    *TINY,
    "tracker=none",
    "model.dropout=0.1",
    "train.max_steps=20",
    "train.checkpoint_every=10",
    "train.eval_every=10",
]


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, cache_dir):
    """strategy name -> folder of its finished 20-step torchrun run (each trained once per session)."""
    from tests.distributed.test_torchrun import torchrun

    root = tmp_path_factory.mktemp("strategies")
    done: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in done:
            torchrun(*STRATEGY_RUN, f"strategy={strategy}", f"run.id={strategy}", f"storage.root={root}")
            done[strategy] = root / strategy
        return done[strategy]

    return get


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One prepared-corpus cache for the whole session."""
    path = tmp_path_factory.mktemp("kiln-cache")
    os.environ["KILN_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing leaves the machine: W&B offline, no hub access."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, reached by s3fs like AWS S3.

    Started once per session; the usual AWS variables point every process (Ray workers, torchrun
    ranks, the CLI) at it. Yields the bucket name; the server is stopped at the end.
    """
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server, endpoint = start_moto(log)
    env = aws_env(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("kiln-test")
    try:
        yield "kiln-test"
    finally:
        stop(server)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()


def kiln(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """Run the installed `kiln` command; returns the CompletedProcess."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [str(BIN / "kiln"), *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or REPO
    )
