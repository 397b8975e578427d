"""`kiln prepare` refuses a dataset that training could not evaluate on: the validation split must hold data."""

from __future__ import annotations

import json

import pytest

from data_pipeline.dataset import DatasetError, open_dataset
from data_pipeline.prepare import PrepareConfig, PrepareError, PrepareSummary, _check_splits


def summary(documents: int, tokens: int, val_documents: int, val_sequences: int) -> PrepareSummary:
    done = PrepareSummary("out", False, documents=documents, tokens=tokens)
    done.splits = {
        "train": {"documents": documents - val_documents, "sequences": 9, "tokens": 9 * 32, "shards": []},
        "val": {"documents": val_documents, "sequences": val_sequences, "tokens": val_sequences * 32, "shards": []},
    }
    return done


def test_a_zero_val_fraction_is_refused_with_the_reason():
    with pytest.raises(
        PrepareError,
        match=r"val_fraction must be in \(0, 0.5\), got 0.0: training evaluates on "
        r"the validation split",
    ):
        PrepareConfig(input="raw/*.jsonl", output="out", val_fraction=0.0)


def test_an_empty_validation_split_names_the_fix():
    cfg = PrepareConfig(input="raw/*.jsonl", output="out", seq_len=32, val_fraction=0.01)
    with pytest.raises(PrepareError) as raised:
        _check_splits(summary(documents=200, tokens=4000, val_documents=1, val_sequences=0), cfg)
    assert str(raised.value) == (
        "the validation split of out would be empty: val_fraction=0.01 put 1 of 200 documents in it, fewer tokens "
        "than one sequence of seq_len=32; add more data or raise val_fraction (e.g. val_fraction=0.02)"
    )


def test_too_little_data_for_any_validation_split_asks_for_more_data():
    cfg = PrepareConfig(input="raw/*.jsonl", output="out", seq_len=1024, val_fraction=0.2)
    with pytest.raises(PrepareError, match=r"put 0 of 3 documents in it, .*; add more data: there is too little"):
        _check_splits(summary(documents=3, tokens=300, val_documents=0, val_sequences=0), cfg)


def test_splits_with_a_sequence_each_pass():
    cfg = PrepareConfig(input="raw/*.jsonl", output="out", seq_len=32)
    _check_splits(summary(documents=200, tokens=4000, val_documents=4, val_sequences=1), cfg)


def test_a_dataset_with_an_empty_validation_split_is_refused_before_training(tmp_path):
    # what a Kiln from before this check could leave: val_fraction=0, so a val split without shards
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "seq_len": 32,
                "vocab_size": 400,
                "eos_id": 0,
                "dtype": "<u2",
                "tokenizer": {"path": "tokenizer"},
                "splits": {
                    "train": {"shards": [{"path": "train/shard_00000.bin", "sequences": 4}]},
                    "val": {"shards": []},
                },
            }
        )
    )
    with pytest.raises(
        DatasetError,
        match=rf"^dataset {tmp_path}: its val split holds no whole sequence of 32 tokens, "
        r"and training reads it; prepare it again with a larger val_fraction",
    ):
        open_dataset(str(tmp_path)).check_trainable()


def test_an_empty_training_split_names_the_fix():
    cfg = PrepareConfig(input="raw/*.jsonl", output="out", seq_len=1024, val_fraction=0.2)
    done = summary(documents=5, tokens=900, val_documents=1, val_sequences=1)
    done.splits["train"]["sequences"] = 0
    with pytest.raises(
        PrepareError,
        match=r"^the training split of out would be empty: it got 4 of 5 documents, fewer "
        r"tokens than one sequence of seq_len=1024; add more data, or lower seq_len",
    ):
        _check_splits(done, cfg)
