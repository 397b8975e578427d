"""task=mlm: masks drawn per row from (seed, split, stream position), so they are the same in any batch, on
any rank and at any world size; BERT's 15% with the 80/10/10 rule; specials never chosen; a tokenizer
without the mask token refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline import tokenizer as bpe
from data_pipeline.batch import Batch
from data_pipeline.dataset import DatasetError
from trainers.config import ModelConfig, TaskConfig
from trainers.models import build_masked_lm
from trainers.task_data import check_task_data
from trainers.tasks import build_task, task_batch
from trainers.tasks.base import IGNORE_INDEX
from trainers.tasks.mlm import mlm_mask

VOCAB, MASK, SPECIALS = 500, 499, (0, 499)
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20


def rows(count: int, seq_len: int = 128, seed: int = 0) -> np.ndarray:
    """Random non-special tokens with an EOS every 16 tokens."""
    tokens = np.random.default_rng(seed).integers(1, MASK, (count, seq_len))
    tokens[:, ::16] = 0
    return tokens


def mask(tokens: np.ndarray, positions, seed: int = 1234, split: str = "train"):
    return mlm_mask(
        tokens,
        seed=seed,
        split=split,
        positions=np.asarray(positions),
        mask_id=MASK,
        vocab_size=VOCAB,
        special_ids=SPECIALS,
    )


def test_a_row_masks_the_same_in_any_batch_on_any_rank():
    tokens = rows(8)
    whole_inputs, whole_labels = mask(tokens, range(100, 108))
    # world size 2: rank 1 holds rows 4..7 (positions 104..107), in a batch of its own
    half_inputs, half_labels = mask(tokens[4:], range(104, 108))
    assert np.array_equal(half_inputs, whole_inputs[4:]) and np.array_equal(half_labels, whole_labels[4:])
    # the same sequence at another position, or in the other split, or with another seed, masks otherwise
    assert not np.array_equal(mask(tokens[:1], [5])[1], mask(tokens[:1], [6])[1])
    assert not np.array_equal(mask(tokens[:1], [5])[1], mask(tokens[:1], [5], split="val")[1])
    assert not np.array_equal(mask(tokens[:1], [5])[1], mask(tokens[:1], [5], seed=1)[1])


def test_the_draws_do_not_depend_on_the_row_s_content():
    """Fixed-shape draws: changing one token changes only what happens at that token."""
    tokens = rows(1)
    other = tokens.copy()
    other[0, 3] = 0 if other[0, 3] else 7  # a special now (or no longer)
    a, b = mask(tokens, [9])[1], mask(other, [9])[1]
    keep = np.arange(tokens.shape[1]) != 3
    assert np.array_equal(a[0, keep] != IGNORE_INDEX, b[0, keep] != IGNORE_INDEX)


def test_bert_rates_and_specials_never_chosen():
    tokens = rows(400, seed=3)  # 51,200 tokens
    inputs, labels = mask(tokens, range(400))
    real = ~np.isin(tokens, SPECIALS)
    chosen = labels != IGNORE_INDEX
    assert not chosen[~real].any()  # EOS (and the mask token) are never targets
    assert np.array_equal(labels[chosen], tokens[chosen])  # a chosen token is its own label
    assert np.array_equal(inputs[~chosen], tokens[~chosen])  # the rest are read unchanged
    rate = chosen.sum() / real.sum()
    masked = (inputs[chosen] == MASK).mean()
    kept = (inputs[chosen] == tokens[chosen]).mean()
    replaced = 1 - masked - kept
    assert abs(rate - 0.15) < 0.006, rate
    assert abs(masked - 0.8) < 0.015 and abs(replaced - 0.1) < 0.01 and abs(kept - 0.1) < 0.012, (masked, kept)
    assert not np.isin(inputs[chosen & (inputs != MASK)], SPECIALS).any()  # random tokens are real tokens


def test_the_tokenizer_keeps_its_size_with_the_mask_token_last():
    tokenizer = bpe.train_bpe(TEXTS, vocab_size=300)
    vocabulary = bpe.vocabulary(tokenizer)
    assert tokenizer.get_vocab_size() == vocabulary.size <= 300
    assert vocabulary.mask_id == vocabulary.size - 1 and tokenizer.token_to_id(bpe.EOS_TOKEN) == 0
    assert vocabulary.specials == (0, vocabulary.mask_id)
    assert tokenizer.encode("<|mask|>").ids == [vocabulary.mask_id]  # one token, never split


def test_mlm_loss_and_metrics_over_the_masked_tokens_only():
    torch.manual_seed(0)
    model = build_masked_lm(ModelConfig(arch="bert", n_layer=1, n_head=2, n_embd=16, n_positions=128), VOCAB, 0)
    vocabulary = bpe.Vocabulary(VOCAB, SPECIALS, MASK)
    task = build_task(TaskConfig("mlm"), 0, seed=1234, vocabulary=vocabulary)
    stored = Batch(rows(4), positions=np.arange(4))
    loss = task.loss(model.train(), task_batch(task, stored, "train", torch.device("cpu")))
    inputs, labels = mask(rows(4), range(4))
    expected = torch.nn.functional.cross_entropy(
        model(input_ids=torch.from_numpy(inputs)).logits.flatten(0, 1), torch.from_numpy(labels).flatten()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    val = task_batch(task, stored, "val", torch.device("cpu"))
    sums = task.evaluate(model.eval(), [val])
    assert sums["tokens"] == (mask(rows(4), range(4), split="val")[1] != IGNORE_INDEX).sum()
    metrics = task.summarize(sums)
    assert set(metrics) == {"val/loss", "val/perplexity", "val/mlm_accuracy"}
    assert 0 <= metrics["val/mlm_accuracy"] <= 1 and metrics["val/loss"] > 0
    again = task_batch(task, stored, "val", torch.device("cpu"))
    assert task.evaluate(model, [again]) == sums  # every evaluation of the same rows masks them the same


def test_data_prepared_without_the_mask_token_is_refused_in_one_line(tmp_path):
    from tokenizers import Tokenizer, models

    old = Tokenizer(models.BPE(vocab={"a": 0, bpe.EOS_TOKEN: 1}, merges=[]))
    bpe.save(old, str(tmp_path / "tokenizer"))
    dataset = type(
        "D", (), {"url": str(tmp_path), "kind": "pretrain", "fields": (), "tokenizer_url": str(tmp_path / "tokenizer")}
    )
    with pytest.raises(DatasetError) as refused:
        check_task_data("mlm", [dataset], print)
    message = str(refused.value)
    assert f"task=mlm needs a mask_token in the tokenizer, but the dataset at {tmp_path}" in message
    assert "kiln prepare" in message and "\n" not in message
    check_task_data("causal_lm", [dataset], print)  # other tasks do not need it


def test_an_exported_masked_lm_folder_is_scored_as_mlm(tmp_path):
    from trainers.export import save_hugging_face
    from trainers.inference.loaded_model import load_folder, vocabulary

    tokenizer = bpe.train_bpe(TEXTS, vocab_size=300)
    bpe.save(tokenizer, str(tmp_path / "tok"))
    model = build_masked_lm(ModelConfig(arch="bert", n_layer=1, n_head=2, n_embd=16, n_positions=32), 300, 0)
    save_hugging_face(model, str(tmp_path / "tok"), str(tmp_path / "out"))
    loaded = load_folder(str(tmp_path / "out"))
    assert (loaded.task.name, type(loaded.model).__name__) == ("mlm", "BertForMaskedLM")
    assert loaded.tokenizer.mask_token == bpe.MASK_TOKEN
    assert vocabulary(loaded) == bpe.vocabulary(tokenizer)  # so kiln eval masks as the run did
