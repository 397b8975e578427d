"""Supervised fine-tuning as a user runs it: `kiln prepare kind=chat` on a JSONL of prompt/response
pairs, then `kiln train task=sft` on two workers; and the data SFT cannot learn from, refused."""

from __future__ import annotations

import pytest

from data_pipeline.dataset import ShardWriter, write_manifest
from tests.helpers import SFT_RUN, kiln_refused, rows

pytestmark = pytest.mark.slow


def test_sft_on_chat_data_learns_the_replies_on_two_workers(sft_run):
    # sft_run (tests/conftest.py): 30 steps on 2 torchrun workers, evaluated at 0, 15 and 30; kiln chat reuses it.
    evaluations = [r for r in rows(sft_run) if "val/loss" in r]
    assert [r["step"] for r in evaluations] == [0, 15, 30]
    loss = [r["val/loss"] for r in evaluations]
    accuracy = [r["val/accuracy"] for r in evaluations]
    # Validation is over the reply tokens only: from a uniform guess to the template and copied numbers.
    assert loss[0] > 5.0 and loss[2] < loss[1] < loss[0] - 2.0, loss
    assert accuracy[2] > accuracy[0] + 0.15, accuracy
    assert all(r["val/perplexity"] < evaluations[0]["val/perplexity"] for r in evaluations[1:])


def test_sft_on_pretraining_data_is_refused_in_one_line_before_any_worker_starts(tmp_path):
    data = tmp_path / "plain"
    splits = {}
    for split in ("train", "val"):
        writer = ShardWriter(str(data), split, seq_len=64, vocab_size=300, eos_id=0)
        writer.add(list(range(1, 200)))
        splits[split] = writer.close()
    # A dataset from before `kind` was recorded: pretraining data.
    write_manifest(str(data), {"seq_len": 64, "vocab_size": 300, "eos_id": 0, "dtype": "<u2", "splits": splits})
    runs = tmp_path / "runs"
    result = kiln_refused("train", *SFT_RUN, f"data.path={data}", f"storage.root={runs}")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert f"task=sft trains on a per-token loss mask, but the dataset at {data} (kind=pretrain)" in message
    assert "kiln prepare kind=chat" in message and "task=causal_lm" in message
    assert not runs.exists() or not list(runs.iterdir())  # nothing registered
