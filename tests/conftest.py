"""Shared fixtures: a small cached stdlib corpus, isolated storage roots, offline W&B."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Small enough for seconds per run on 2 CPU cores, big enough that loss visibly falls.
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.n_positions=64",
    "data.seq_len=64", "data.vocab_size=512", "data.max_files=60",
    "train.global_batch=8", "train.micro_batch=4", "train.eval_batches=2", "optim.warmup_steps=2",
]


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


def kiln(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """Run the installed `kiln` command; returns the CompletedProcess."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([str(BIN / "kiln"), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd or REPO)
