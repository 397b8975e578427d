"""What several test files share: run settings, the CLI and torchrun as processes, tiny checkpointed
models, a planted checkpoint payload, and the contract every Tracker keeps.

Test files import from here, never from each other (a test_*.py module is pytest's to collect, not a
library). torch and the trainers load inside the functions that need them: tests/conftest.py imports
this module in every pytest run, and a CLI or config test should not pay for torch.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from data_pipeline.dataset import Dataset

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# The tests' two tiny decoders, each a step as cheap as the other: seconds per run on 2 CPU cores, big enough that
# loss visibly falls. GPT-2 (Kiln's default model) where a test is about GPT-2 or one of its heads; a Llama 3 shape
# (llama3_tiny narrowed: RoPE, RMSNorm, SwiGLU, 2 query heads sharing 1 key/value head, an untied output head), the
# family users bring, for the stories any decoder tells: strategies agree, exact resume, resharding, export.
GPT2_SHAPE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.n_positions=64"]
LLAMA_SHAPE = [
    "model=llama3_tiny",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_kv_head=1",
    "model.n_embd=64",
    "model.intermediate_size=128",  # a narrow SwiGLU pays for the untied head: GPT-2's ~137k parameters, and its speed
    "model.n_positions=64",
]
TINY_BATCH = ["train.global_batch=8", "train.micro_batch=4"]
# A tiny run's data: the built-in corpus, 64-token sequences (as long as both shapes' positions reach).
TINY_DATA = [
    "data.seq_len=64",
    "data.vocab_size=512",
    "data.max_files=60",
    "train.eval_batches=2",
    "optim.warmup_steps=2",
]

# The tiny GPT-2 and its batch; on the built-in corpus.
TINY_MODEL = [*GPT2_SHAPE, *TINY_BATCH]
TINY = [*TINY_MODEL, *TINY_DATA]

# The tiny Llama and its batch on the built-in corpus.
LLAMA_TINY = [*LLAMA_SHAPE, *TINY_BATCH, *TINY_DATA]

# The reference run of each strategy, on the tiny Llama: 2 workers, fp32, attention dropout on (so RNG restore
# matters).
STRATEGY_RUN = [
    *LLAMA_TINY,
    "tracker=none",
    "model.dropout=0.1",
    "train.max_steps=20",
    "train.checkpoint_every=10",
    "train.eval_every=10",
]

# Supervised fine-tuning of a tiny model on `kiln prepare kind=chat` data (with data.path=...).
SFT_RUN = [
    "task=sft",
    "data=prepared",
    "data.seq_len=64",
    *TINY_MODEL,
    "train.eval_batches=2",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "tracker=none",
]


# The commands that only read a run folder (no Ray, no worker, no model): `kiln` runs them in this process.
READERS = frozenset({"status", "runs", "logs", "plot", "compare"})


def kiln(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """Run the installed `kiln` command (a reader, in this process: kiln_here); returns the CompletedProcess."""
    if args and args[0] in READERS and cwd is None:
        return kiln_here(*args, env=env)
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [str(BIN / "kiln"), *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or REPO
    )


def kiln_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`kiln ARGS` run in this process, as `kiln` would run it (exit code, stdout, stderr), without an interpreter's
    start-up: for the commands that start no Ray and no worker (status, runs, logs, plot, compare, stop, export,
    eval, and every refusal that comes before Ray)."""
    import contextlib
    import io

    from orchestrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update({"COLUMNS": "200", **(env or {})})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's --help and usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["kiln", *args], code, out.getvalue(), err.getvalue())


def kiln_refused(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`kiln ARGS` in this process, for a command the test expects refused before it starts anything: Ray
    cannot start meanwhile, so a command that got past its checks fails naming that, instead of training."""
    from unittest import mock

    started = AssertionError(f"kiln {' '.join(args)} started Ray: it was expected to be refused first")
    with mock.patch("ray.init", side_effect=started):
        return kiln_here(*args, env=env)


def config_refused(*overrides: str) -> str:
    """The one-line UsageError message composing these `kiln train` overrides is refused with (it must be)."""
    from orchestrator.config import UsageError, compose_config

    with pytest.raises(UsageError) as err:
        compose_config(list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


def prepare_rows(folder: Path, rows: list[dict], *settings: str) -> Path:
    """Write rows as folder/rows.jsonl and `kiln prepare` them into folder/prepared (must succeed; no cluster)."""
    with open(folder / "rows.jsonl", "w") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)
    result = kiln(
        "prepare",
        f"input={folder / 'rows.jsonl'}",
        f"output={folder / 'prepared'}",
        *settings,
        env={"RAY_ADDRESS": "127.0.0.1:9"},  # a stale cluster address: prepare starts its own local Ray
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return folder / "prepared"


def torchrun_command(*target: str, nproc: int = 2) -> list[str]:
    """`torchrun --standalone --nproc-per-node N TARGET...` with this interpreter (a script, or -m MODULE)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target]


def torchrun(*args: str, timeout: float = 300, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m orchestrator.torchrun ARGS` (N=2 unless told); must succeed."""
    cmd = torchrun_command("-m", "orchestrator.torchrun", *args, nproc=nproc)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def runs_per_strategy(root: Path, *args: str):
    """strategy -> folder of its finished torchrun run of ARGS under root, trained the first time any process
    sharing root asks for it (a lock per strategy; a run counts once its run.json says SUCCEEDED)."""
    from filelock import FileLock

    def get(strategy: str) -> Path:
        folder = root / strategy
        with FileLock(str(root / f"{strategy}.lock")):
            if not finished(folder):
                if folder.exists():  # a run another worker left half done (it failed that worker's test)
                    import shutil

                    shutil.rmtree(folder)
                torchrun(*args, f"strategy={strategy}", f"run.id={strategy}", f"storage.root={root}")
        return folder

    return get


def finished(run_dir: Path) -> bool:
    """True once the run's record says it SUCCEEDED."""
    try:
        return json.loads((run_dir / "run.json").read_text())["state"] == "SUCCEEDED"
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


def rows(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict a line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def storage_warnings(caplog) -> list[str]:
    """The warnings (and worse) Kiln's storage layer logged: its retries and their reasons."""
    return [r.getMessage() for r in caplog.records if r.name == "kiln.storage" and r.levelno >= logging.WARNING]


# A tiny model under a strategy, stepped and checkpointed: what the checkpoint tests build on.

ZERO = {"zero1": (1, False), "zero3_offload": (3, True)}


def strategy(name: str = "ddp"):
    """A seeded two-layer model wrapped by the named strategy (fp32, CPU)."""
    import torch
    from torch import nn

    from trainers.config import OptimConfig, StrategyConfig
    from trainers.strategies import build_strategy

    torch.manual_seed(0)
    stage, offload = ZERO.get(name, (0, False))
    s = build_strategy(
        StrategyConfig(
            name=name, precision="fp32", zero_stage=stage, offload_optimizer=offload, offload_params=offload
        ),
        torch.device("cpu"),
    )
    s.wrap(
        nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)),
        OptimConfig(warmup_steps=0),
        max_steps=10,
        micro_batch=3,
        grad_accum=1,
    )
    return s


def train_one_step(s) -> None:
    """One optimizer step on a random batch."""
    import torch

    loss = s.model(torch.randn(3, 4)).pow(2).mean()
    s.backward(loss)
    s.step()


def weights(s) -> dict:
    """A copy of the full model state."""
    from tests.strategy_weights import full_model_state

    return {k: v.clone() for k, v in full_model_state(s).items()}


def store_at(tmp_path, name: str = "ddp", **options):
    """A one-rank CheckpointStore under tmp_path/checkpoints."""
    from trainers.checkpoint.store import CheckpointStore

    return CheckpointStore(
        str(tmp_path / "checkpoints"), rank=0, world_size=1, strategy=name, config_hash="h", **options
    )


def save_steps(s, store, steps=(1, 2)) -> dict:
    """Train and save each step in turn; step -> the weights its checkpoint holds."""
    saved = {}
    for step in steps:
        train_one_step(s)
        store.save(step, s, {"step": step})
        saved[step] = weights(s)
    return saved


def save_two(tmp_path, name: str = "ddp"):
    """Two committed checkpoints (steps 1 and 2) and the weights each holds."""
    store = store_at(tmp_path, name)
    return store, save_steps(strategy(name), store)


def restore_through_copy(store, name: str, monkeypatch) -> str:
    """Save steps 1 and 2 to an object store, restore step 2 exactly; the URL the strategy loaded shards from.

    Checks that the restore's verified copy (in memory or a local folder) is gone afterwards.
    """
    import fsspec
    import torch

    from data_pipeline import storage

    saved = save_steps(strategy(name), store)
    fresh = strategy(name)
    loaded_from: list[str] = []
    load = type(fresh).load

    def recorded_load(self, url: str, saved_world_size=None) -> None:
        loaded_from.append(url)
        load(self, url, saved_world_size)

    monkeypatch.setattr(type(fresh), "load", recorded_load)
    restored = store.restore(fresh)
    assert restored.committed.step == 2 and restored.extra == {"step": 2}
    for key, value in weights(fresh).items():
        assert torch.equal(value, saved[2][key]), key
    [url] = loaded_from
    assert not [path for path in fsspec.filesystem("memory").store if "kiln-restore-" in path]
    assert not url.startswith(store.root) and not storage.exists(url.removesuffix("/shards"))
    return url


# Someone who can write the bucket plants a pickle payload in a checkpoint and makes MANIFEST.json agree.

REFUSED = "holds objects Kiln will not load"


class Payload:
    """What an attacker plants: unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(checkpoint: Path, rel: str, data: bytes) -> None:
    """Replace a checkpoint file and make MANIFEST.json agree, as an attacker with write access would."""
    (checkpoint / rel).write_bytes(data)
    manifest_path = checkpoint / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["path"] == rel:
            entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def torch_bytes(obj) -> bytes:
    """obj as torch.save writes it."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def assert_falls_back_to_step_1(store, saved, name: str, rel: str) -> None:
    """Restore skips the planted step 2, naming the file, and loads step 1's weights."""
    import torch

    fresh = strategy(name)
    restored = store.restore(fresh)
    assert restored.committed.step == 1 and restored.extra == {"step": 1}
    assert rel in restored.skipped[0] and REFUSED in restored.skipped[0]
    for key, value in weights(fresh).items():
        assert torch.equal(value, saved[1][key]), key


# The Tracker protocol (trainers/tracking.py), kept by every implementation.

# The loop reports train metrics and then eval metrics at the same step; both must come back there.
REPORTS = [
    (1, {"train/loss": 2.5, "train/lr": 0.001}),
    (2, {"train/loss": 2.0}),
    (2, {"val/loss": 2.25}),
]
AT_STEPS = {1: {"train/loss": 2.5, "train/lr": 0.001}, 2: {"train/loss": 2.0, "val/loss": 2.25}}


class TrackerContract(abc.ABC):
    """What every Tracker promises. A test file subclasses it as Test<Implementation> and defines:

    tracker(folder): a fresh tracker that writes under folder;
    logged(folder): {step: metrics} as the implementation stored them, read back from its files.
    """

    @abc.abstractmethod
    def tracker(self, folder: Path):
        """A fresh tracker writing under folder."""

    @abc.abstractmethod
    def logged(self, folder: Path) -> dict[int, dict]:
        """{step: metrics} as the implementation stored them."""

    @pytest.mark.parametrize("state", ["SUCCEEDED", "FAILED"])
    def test_what_was_logged_comes_back_at_its_steps_however_the_run_ends(self, tmp_path, state):
        tracker = self.tracker(tmp_path)
        for step, metrics in REPORTS:
            tracker.log(metrics, step)
        tracker.finish(state)
        assert self.logged(tmp_path) == AT_STEPS

    def test_flush_makes_what_was_logged_durable_before_the_run_ends(self, tmp_path):
        tracker = self.tracker(tmp_path)
        for step, metrics in REPORTS:
            tracker.log(metrics, step)
        tracker.flush()  # what a checkpoint does: a crash after it must not lose these steps
        try:
            assert self.logged(tmp_path) == AT_STEPS
        finally:
            tracker.finish("SUCCEEDED")


# Store errors, as botocore raises them, and functions that fail on cue: for the retry tests.


def client_error(code: str, status: int, message: str = "boom"):
    """A botocore ClientError with this code and HTTP status."""
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


def failing(*errors: BaseException):
    """A function raising errors one call at a time, then returning 'done'; .calls counts calls."""

    def fn():
        fn.calls += 1
        if fn.calls <= len(errors):
            raise errors[fn.calls - 1]
        return "done"

    fn.calls = 0
    return fn


# The data stream's tests: sequences that say where they come from.


def numbered_dataset(url: str, first_tokens: range) -> Dataset:
    """A dataset of 4-token sequences, one per number, whose first token is that number, 10 sequences a shard."""
    import data_pipeline.dataset as ds
    from data_pipeline.dataset import Dataset, ShardWriter, write_manifest

    seq = 4

    ds_shard = ds.SHARD_TOKENS
    ds.SHARD_TOKENS = 10 * seq
    try:
        writer = ShardWriter(url, "train", seq_len=seq, vocab_size=1000, eos_id=999)
        for i in first_tokens:
            writer.add([i, 1, 2])  # + EOS = exactly one sequence per document
        entry = writer.close()
    finally:
        ds.SHARD_TOKENS = ds_shard
    write_manifest(
        url,
        {
            "seq_len": seq,
            "vocab_size": 1000,
            "eos_id": 999,
            "dtype": "<u2",
            "tokenizer": {"sha256": "same"},
            "splits": {"train": entry},
        },
    )
    return Dataset(url)


def tiny_llama(vocab_size: int, positions: int):
    """A seeded 1-layer Llama with GQA (2 query heads, 1 key/value head), built in this process (no folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=positions,
    )
    return LlamaForCausalLM(config)
