"""task=dpo's reference pass in one process (a one-rank gloo group): a tiny Llama scores every prepared pair once, the
tables are committed and read back by the next start instead of computed again, and the Evaluator's val batches are
the pass's batches, so at the reference every reward is exactly 0."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.dataset import Dataset
from data_pipeline.prepare import PrepareConfig, prepare
from tests.helpers import tiny_llama
from tests.tokenizer_folders import LLAMA3, save_tokenizer
from trainers.checkpoint import reference as artefact
from trainers.config import OptimConfig, StrategyConfig
from trainers.evaluation import Evaluator
from trainers.reference import ReferencePass, prepare_reference
from trainers.strategies import build_strategy
from trainers.tasks.dpo import DPO
from trainers.watchdog import StepWatchdog

SEQ_LEN = 32


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Dataset:
    """22 string pairs prepared with a Llama 3 tokenizer (some in val)."""
    tmp = tmp_path_factory.mktemp("pairs")
    folder = save_tokenizer(LLAMA3, tmp / "tokenizer")
    rows = [f'{{"prompt": "what is {i} plus {i}?", "chosen": " {2 * i}.", "rejected": " no."}}' for i in range(22)]
    (tmp / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    cfg = PrepareConfig(
        input=str(tmp / "pairs.jsonl"),
        output=str(tmp / "out"),
        kind="preference",
        tokenizer=str(folder),
        seq_len=SEQ_LEN,
        val_fraction=0.3,
    )
    prepare(cfg, log=lambda _: None)
    return Dataset(str(tmp / "out"))


def reference_pass(run: Path, dataset: Dataset, micro_batch: int = 3):
    """A fresh worker's pieces: the tiny Llama wrapped by DDP on one rank, its DPO task without a reference."""
    strategy = build_strategy(StrategyConfig(name="ddp", precision="fp32"), torch.device("cpu"))
    model = strategy.wrap(tiny_llama(dataset.vocab_size, SEQ_LEN), OptimConfig(warmup_steps=0), 10, micro_batch, 1)
    task = DPO()
    return ReferencePass(str(run), dataset, task, model, strategy, torch.device("cpu"), 0, 1, 0, 1, micro_batch)


def no_watchdog() -> StepWatchdog:
    return StepWatchdog(0, 0, on_hang=lambda _: None)


def test_the_pass_scores_every_pair_commits_them_and_a_restart_reads_them(process_group, pairs, tmp_path, monkeypatch):
    first = reference_pass(tmp_path, pairs)
    prepare_reference(first, no_watchdog())
    tables = first.task.reference
    assert tables is not None and {split: len(tables[split]) for split in tables} == first.pairs()
    assert all((table < 0).all() for table in tables.values())  # every answer scored, each a sum of log-probs < 0
    assert artefact.damaged(artefact.reference_url(str(tmp_path))) is None

    def computed_again(*_):
        raise AssertionError("a committed reference was computed again")

    monkeypatch.setattr("trainers.reference.compute_tables", computed_again)
    again = reference_pass(tmp_path, pairs)
    prepare_reference(again, no_watchdog())
    assert again.task.reference is not None
    for split, table in tables.items():
        assert np.array_equal(again.task.reference[split], table), split


def test_at_the_reference_the_evaluators_val_pairs_have_zero_rewards_and_loss_log_2(process_group, pairs, tmp_path):
    setup = reference_pass(tmp_path, pairs, micro_batch=2)
    prepare_reference(setup, no_watchdog())
    evaluator = Evaluator(
        [pairs],
        None,
        task=setup.task,
        strategy=setup.strategy,
        device=setup.device,
        rank=0,
        world_size=1,
        micro_batch=2,
        seed=0,
        batches=2,
        every=10,
        last_step=10,
    )
    metrics = evaluator(setup.model)
    assert {metrics[f"val/rewards/{name}"] for name in ("chosen", "rejected", "accuracies", "margins")} == {0.0}
    assert metrics["val/loss"] == float(np.float32(math.log(2)))
    assert metrics["val/logps/chosen"] < 0 and metrics["val/logps/rejected"] < 0
