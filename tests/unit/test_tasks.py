"""Tasks as a user meets them: SFT learns only what the chat mask marks, causal LM reports next-token
accuracy, every task name is registered and configurable, and data a task cannot learn from is refused."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.dataset import DatasetError
from trainers.config import ConfigError, ModelConfig, TaskConfig
from trainers.models import build_gpt2
from trainers.task_data import TASK_NEEDS, check_task_data
from trainers.tasks import TASKS, build_task

VOCAB = 40


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_gpt2(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=16), VOCAB, 0).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def per_position_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Cross entropy of predicting token t+1 at every position t, shape (rows, seq_len - 1)."""
    logits = model(input_ids=tokens).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def test_sft_with_a_mask_of_all_ones_is_plain_causal_lm(model, tokens):
    plain = build_task(TaskConfig("causal_lm"), 0).loss(model, Batch(tokens))
    sft = build_task(TaskConfig("sft"), 0).loss(
        model, Batch(tokens, loss_mask=torch.ones_like(tokens, dtype=torch.uint8))
    )
    torch.testing.assert_close(sft, plain)


def test_sft_ignores_the_prompt_tokens_and_learns_the_reply(model, tokens):
    mask = torch.zeros_like(tokens, dtype=torch.uint8)
    mask[:, 8:] = 1  # the "reply": tokens 8..11 of each row, predicted at positions 7..10
    loss = build_task(TaskConfig("sft"), 0).loss(model, Batch(tokens, loss_mask=mask))
    torch.testing.assert_close(loss, per_position_loss(model, tokens)[:, 7:].mean())
    # A micro-batch with nothing to learn (a long prompt filling it) is a zero loss and no gradient, not NaN.
    nothing = build_task(TaskConfig("sft"), 0).loss(model, Batch(tokens, loss_mask=torch.zeros_like(mask)))
    assert float(nothing.detach()) == 0.0
    nothing.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_sft_validation_is_over_the_learned_tokens_only(model, tokens):
    mask = torch.zeros_like(tokens, dtype=torch.uint8)
    mask[0, 4:] = 1
    mask[2, 10:] = 1
    sft = build_task(TaskConfig("sft"), 0)
    sums = sft.evaluate(model, [Batch(tokens, loss_mask=mask)])
    learned = per_position_loss(model, tokens).detach()[mask[:, 1:].bool()]
    assert sums["tokens"] == 8 + 2
    metrics = sft.summarize(sums)
    assert metrics["val/loss"] == pytest.approx(float(learned.mean()), rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]))


class PlusOne(nn.Module):
    """A stand-in model that always predicts token + 1 (so its accuracy is known in advance)."""

    def forward(self, input_ids, labels=None):
        logits = F.one_hot((input_ids + 1) % VOCAB, VOCAB).float() * 10
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:]) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


def test_causal_lm_reports_next_token_accuracy_weighted_by_tokens_across_ranks():
    task = build_task(TaskConfig("causal_lm"), 0)
    # rank 0: 1 row, 4 of 5 next tokens follow +1; rank 1: 3 rows, 0 of 15 do.
    rank0 = task.evaluate(PlusOne(), [Batch(torch.tensor([[1, 2, 3, 4, 9, 10]]))])
    rank1 = task.evaluate(PlusOne(), [Batch(torch.tensor([[5, 5, 5, 5, 5, 5]] * 3))])
    assert task.summarize(rank0)["val/accuracy"] == pytest.approx(4 / 5)
    pooled = task.summarize({k: rank0[k] + rank1[k] for k in rank0})  # what the evaluator's all-reduce sums
    assert pooled["val/accuracy"] == pytest.approx(4 / 20)  # not the mean of the ranks' 0.8 and 0.0
    assert set(pooled) == {"val/loss", "val/perplexity", "val/accuracy"}


def test_every_task_is_registered_configurable_and_has_a_config_entry():
    assert set(TASKS) == set(TASK_NEEDS)
    conf = Path(__file__).resolve().parents[2] / "conf" / "task"
    assert {p.stem for p in conf.glob("*.yaml")} == set(TASKS)
    for name in TASKS:
        assert TaskConfig(name=name).name == name
    with pytest.raises(ConfigError, match="task.name must be one of causal_lm, sft"):
        TaskConfig(name="classify")


def dataset(kind: str, fields: tuple[str, ...]) -> SimpleNamespace:
    return SimpleNamespace(url=f"/data/{kind}", kind=kind, fields=fields)


def test_sft_refuses_data_without_a_loss_mask_and_says_how_to_make_some():
    notes: list[str] = []
    with pytest.raises(DatasetError) as refused:
        check_task_data("sft", [dataset("pretrain", ())], notes.append)
    message = str(refused.value)
    assert "/data/pretrain (kind=pretrain)" in message and "kiln prepare kind=chat" in message
    assert "\n" not in message
    check_task_data("sft", [dataset("chat", ("loss_mask",))], notes.append)
    assert notes == []


def test_causal_lm_trains_on_chat_data_and_says_it_ignores_the_mask():
    notes: list[str] = []
    check_task_data("causal_lm", [dataset("chat", ("loss_mask",)), dataset("pretrain", ())], notes.append)
    assert len(notes) == 1 and "ignores a per-token loss mask" in notes[0] and "task=sft" in notes[0]
