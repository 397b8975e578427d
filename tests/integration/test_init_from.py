"""Pretrain -> export -> start again from it: `model.init_from=DIR` and `model.init_from=run:RUN[@STEP]`.

A new run that starts from a model evaluates, at its step 0, exactly what its source logged last: the same
weights on every rank (here 2 workers, DDP and FSDP2), the same validation tokens. Bad sources fail in one
line before any worker starts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import LLAMA_TINY, kiln, kiln_refused, rows, torchrun

pytestmark = pytest.mark.slow

DATA = [o for o in LLAMA_TINY if not o.startswith("model")]  # the model's arch and shape come from the source
# 2 workers x 1 evaluation batch read the same 8 validation sequences as 1 worker x 2 batches.
FINE_TUNE = [*DATA, "tracker=none", "train.max_steps=1", "train.eval_batches=1", "train.checkpoint_every=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, cache_dir) -> Path:
    """Storage root holding run `pre` (1 worker, 10 steps, evaluated and checkpointed at 5 and 10) and its export."""
    root = tmp_path_factory.mktemp("init-from")
    overrides = [*LLAMA_TINY, "tracker=none", "optim.lr=3e-3", "train.max_steps=10", "train.eval_every=5"]
    overrides += ["train.checkpoint_every=5", "run.id=pre", f"storage.root={root}"]
    torchrun(*overrides, nproc=1)
    exported = kiln("export", "pre", "--out", str(root / "hf"), "--storage-root", str(root))
    assert exported.returncode == 0, exported.stderr[-3000:]
    return root


def val_loss(run_dir: Path, step: int) -> float:
    (value,) = [r["val/loss"] for r in rows(run_dir) if r["step"] == step and "val/loss" in r]
    return value


def train_loss(run_dir: Path, step: int) -> float:
    (value,) = [r["train/loss"] for r in rows(run_dir) if r["step"] == step and "train/loss" in r]
    return value


def test_fine_tuning_an_exported_folder_and_a_run_starts_where_the_source_ended(pretrained, tmp_path):
    root, final = pretrained, val_loss(pretrained / "pre", 10)
    source = tmp_path / "source"  # a folder with more than a model in it, deleted once the run has started
    shutil.copytree(root / "hf", source)
    (source / "notes.txt").write_text("not a model file")
    torchrun(*FINE_TUNE, f"model.init_from={source}", "run.id=from-dir", f"storage.root={root}")
    torchrun(*FINE_TUNE, "model.init_from=run:pre", "strategy=fsdp", "run.id=from-run", f"storage.root={root}")
    for run in ("from-dir", "from-run"):
        assert val_loss(root / run, 0) == pytest.approx(final, abs=1e-5), run  # a new run, not a resume
        assert [r["step"] for r in rows(root / run) if "train/loss" in r] == [1]
    # DDP and FSDP2 ranks all started from the same weights: the same first step.
    assert train_loss(root / "from-run", 1) == pytest.approx(train_loss(root / "from-dir", 1), rel=1e-5)
    # Both sources were copied into the new run (only the model's files), and its config names the copy, so
    # the run stands on its own (export, eval, resume) when its source is gone.
    for run in ("from-dir", "from-run"):
        copied = root / run / "init_model"
        assert (copied / "model.safetensors").is_file() and not (copied / "notes.txt").exists(), run
        assert f"init_from: {copied}" in (root / run / "config.yaml").read_text(), run
    record = json.loads((root / "from-run" / "run.json").read_text())
    assert any("run pre step 10 (ddp)" in note for note in record["notes"])
    shutil.rmtree(source)
    exported = kiln("export", "from-dir", "--out", str(tmp_path / "out"), "--storage-root", str(root))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_run_at_a_step_starts_from_that_checkpoint(pretrained):
    """run:RUN@STEP on the driver (in this process): the staged model evaluates as the run logged at STEP."""
    from data_pipeline.dataset import open_training_data
    from orchestrator.config import compose_config
    from orchestrator.run.planning import start_run
    from trainers.inference.loaded_model import load_folder, validation_metrics

    root = pretrained
    cfg = compose_config([*FINE_TUNE, "model.init_from=run:pre@5", "run.id=at-5", f"storage.root={root}"])
    start_run(cfg, log=lambda _: None)
    assert cfg.model.init_from == str(root / "at-5" / "init_model")
    datasets, weights = open_training_data(cfg.data.source, cfg.data.path, cfg.data.mixture)
    loaded = load_folder(cfg.model.init_from)
    metrics = validation_metrics(
        loaded.build_task(), loaded.model, datasets, weights, micro_batch=4, batches=2, seed=1234
    )
    assert metrics["val/loss"] == pytest.approx(val_loss(root / "pre", 5), abs=1e-5)


def test_bad_sources_fail_in_one_line_before_anything_starts(pretrained, tmp_path):
    from data_pipeline import tokenizer as bpe
    from orchestrator.config import UsageError, compose_config, finalize
    from orchestrator.run.planning import check_submission_source, resolve_data, start_run
    from orchestrator.run.registry import UnknownRun

    root = pretrained
    other = tmp_path / "other-tokenizer"
    shutil.copytree(root / "hf", other)
    bpe.save(bpe.train_bpe(["a b c d e f"] * 10, vocab_size=300), str(other))  # replaces tokenizer.json
    (tmp_path / "not-a-model").mkdir()
    cases = {
        str(tmp_path / "missing"): "no such folder",
        str(tmp_path / "not-a-model"): "is not a Hugging Face model folder (no config.json)",
        str(other): "is not the one the data at",
        "run:nope": "unknown run 'nope'",
        "run:pre@7": "run pre has no checkpoint at step 7; it has [5, 10]",
    }
    for source, expected in cases.items():
        cfg = compose_config([*FINE_TUNE, f"model.init_from={source}", f"storage.root={root}"])
        with pytest.raises((UsageError, UnknownRun)) as raised:
            start_run(cfg, log=lambda _: None)
        message = str(raised.value)
        assert expected in message and "\n" not in message, message
        assert f"model.init_from={source}" in message, message
        assert not (root / str(cfg.run.id)).exists(), source  # nothing left behind
    # `kiln submit` checks the same from here, the data being known (nothing staged or registered).
    cases = {**cases, "hf": "is not an absolute path", "run:pre@7": "run pre has no checkpoint at step 7"}
    for source, expected in cases.items():
        cfg = compose_config([*FINE_TUNE, f"model.init_from={source}", f"storage.root={root}"])
        finalize(cfg)
        data = resolve_data(cfg, log=lambda _: None)
        with pytest.raises(UsageError, match=re.escape(expected)) as raised:
            check_submission_source(cfg, data)
        assert "\n" not in str(raised.value) and f"model.init_from={source}" in str(raised.value)
    for good in (str(root / "hf"), "run:pre@5"):
        cfg = compose_config([*FINE_TUNE, f"model.init_from={good}", f"storage.root={root}"])
        finalize(cfg)
        check_submission_source(cfg, resolve_data(cfg, log=lambda _: None))
        assert cfg.model.init_from == good
    # The data's vocabulary and the folder's are both named; the CLI says it in one line, exit 2.
    result = kiln_refused(
        "train", *FINE_TUNE, f"model.init_from={other}", "cluster.num_workers=1", f"storage.root={root}"
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert f"the tokenizer of model.init_from={other} (vocabulary of " in result.stderr, result.stderr
    assert "was prepared with (vocabulary of " in result.stderr and "kiln prepare tokenizer=" in result.stderr
