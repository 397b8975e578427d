"""Shared fixtures: a small cached stdlib corpus, offline W&B, the session's S3 server, a gloo group.

Shared helpers (run settings, `kiln`, `torchrun`) live in tests/helpers.py.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

# Two pytest-xdist processes share the two cores, and each starts CLI subprocesses: torch's default of one
# intra-op thread per core in each of them oversubscribed the cores (the in-process and CLI tests ran ~8% slower).
# Set before anything imports torch; subprocesses inherit it. Workers set their own (train.torch_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.helpers import SFT_RUN, STRATEGY_RUN, prepare_rows, runs_per_strategy, torchrun
from tests.ray_cluster import LocalRayCluster
from tests.s3_server import aws_env, start_moto, stop

# What the slowest test files took alone (seconds; the sequential clean-clone run of a8e6412 in
# docs/benchmarks.md). pytest-xdist's `--dist loadfile` hands files out in collection order (the Makefile
# turns off its reordering by test count, which put these few-test files last), so they go first and the
# short ones fill in beside them at the end: longest-processing-time-first, against a tail where one
# process runs a long story alone.
SLOW_FILES = {
    "tests/integration/test_sweep.py": 539,
    "tests/integration/test_cluster.py": 477,
    "tests/integration/test_fault_tolerance.py": 343,
    "tests/distributed/test_mesh.py": 300,  # estimated: issue 28 added it after that run
    "tests/integration/test_classification.py": 249,
    "tests/integration/test_finetune_story.py": 188,
    "tests/distributed/test_strategies.py": 185,
    "tests/integration/test_prepare.py": 150,
    "tests/integration/test_mlm.py": 138,
    "tests/integration/test_quickstart.py": 112,
    "tests/distributed/test_lora.py": 109,
    "tests/distributed/test_dpo.py": 140,  # measured alone, training its run:ddp base (about 10 s of it) itself
    "tests/integration/test_chat.py": 91,
    "tests/distributed/test_compile.py": 85,
}


def pytest_collection_modifyitems(config, items) -> None:
    """The slowest files first (a stable sort: each file keeps its tests' order)."""
    items.sort(key=lambda item: -SLOW_FILES.get(item.nodeid.split("::")[0], 0))


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder every pytest-xdist worker of this session shares (just this process's, without xdist)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, cache_dir):
    """strategy name -> folder of its finished 20-step torchrun run of STRATEGY_RUN (trained once per session,
    by whichever xdist worker asks first)."""
    return runs_per_strategy(shared_folder(tmp_path_factory, "strategies"), *STRATEGY_RUN)


def made_once(folder: Path, make: Callable[[Path], object]) -> Path:
    """folder, made by `make(folder)` the first time any process of the session asks (a lock; a `made` marker
    is written last, so a folder another worker left half made, failing its test, is made again)."""
    from filelock import FileLock

    with FileLock(f"{folder}.lock"):
        if not (folder / "made").exists():
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(exist_ok=True)  # shared_folder, in another worker, may have made it again meanwhile
            make(folder)
            (folder / "made").touch()
    return folder


def write_chat_data(folder: Path) -> None:
    """400 "what is A plus B?" conversations in folder/rows.jsonl, prepared into folder/prepared."""
    rng = random.Random(0)
    rows = []
    for _ in range(400):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({"prompt": f"what is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
    prepare_rows(folder, rows, "kind=chat", "seq_len=64", "vocab_size=300", "val_fraction=0.1")


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """400 "what is A plus B?" conversations, prepared with the chat template and its loss mask (once a session)."""
    return made_once(shared_folder(tmp_path_factory, "chat"), write_chat_data) / "prepared"


def train_sft(chat_data: Path, root: Path) -> None:
    """Run `sft` under root: task=sft on chat_data, 30 steps on 2 torchrun workers."""
    torchrun(
        *SFT_RUN,
        f"data.path={chat_data}",
        "train.max_steps=30",
        "train.eval_every=15",
        "train.checkpoint_every=30",
        "run.id=sft",
        f"storage.root={root}",
    )


@pytest.fixture(scope="session")
def sft_run(chat_data, tmp_path_factory) -> Path:
    """Folder of run `sft`: task=sft on chat_data, 30 steps on 2 torchrun workers, evaluated at 0/15/30,
    checkpointed at 30. Trained once per session: test_sft checks what it learned, test_chat talks to it (LoRA
    SFT through the embedded Ray: tests/integration/test_finetune_story.py)."""
    root = made_once(shared_folder(tmp_path_factory, "sft"), lambda root: train_sft(chat_data, root))
    return root / "sft"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One prepared-corpus cache for the whole session, shared by its xdist workers (a corpus is prepared
    deterministically and committed by its manifest, written last, so two preparing at once agree)."""
    path = shared_folder(tmp_path_factory, "kiln-cache")
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


@pytest.fixture(scope="session")
def ray_cluster(s3, cache_dir, tmp_path_factory):
    """A real Ray cluster on this machine: a head (1 CPU) and two worker nodes `node_a`, `node_b` (1 CPU each).

    Token authentication is on. Its nodes hold the S3 credentials (as a real cluster's nodes would,
    from their environment); clients get only the token, through `ray_cluster.client_env(...)`.
    Started once per session, after the S3 server, and stopped (every process of it) at the end.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cluster = LocalRayCluster(tmp_path_factory.mktemp("ray-cluster"), base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.leftovers(), f"Ray processes left behind: {cluster.leftovers()}"


@pytest.fixture
def fresh_s3fs():
    """s3fs clients made in a test see its environment, and none outlive it."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group, for code that uses collectives (DCP, DDP)."""
    import torch.distributed as dist

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def deepspeed_env(monkeypatch):
    """What a launcher sets for DeepSpeed, here for one process on the existing gloo group."""
    for key, value in {
        "LOCAL_RANK": "0",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }.items():
        monkeypatch.setenv(key, value)
