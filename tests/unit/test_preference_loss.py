"""Kiln's DPO loss and metrics equal TRL's DPOTrainer computation, for each loss, on the same log-probs.

TRL 1.16 has no standalone loss function: its smallest unit is `DPOTrainer._compute_loss`, called here unbound with
the trainer's settings and a model that returns given per-token log-probs (TRL sums them over the answer itself).
So both sides get the same policy log-probs and the same precomputed reference log-probs, as the issue asks.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainers.tasks.preference import (
    PAIR_STATS,
    answer_logps,
    pair_metrics,
    pair_sums,
    preference_loss,
)

PAIRS, LENGTH = 5, 12


class GivenLogps(nn.Module):
    """A model whose forward returns fixed per-token log-probs (what TRL's fused LM head returns)."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = per_token

    def forward(self, **_: object) -> SimpleNamespace:
        shape = self.per_token.shape
        zeros = torch.zeros(shape, dtype=torch.float64)
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def batch(seed: int) -> dict[str, torch.Tensor]:
    """PAIRS pairs as TRL batches them (chosen rows, then rejected rows): answers of unequal lengths after a prompt
    of 3-5 tokens, per-token log-probs on the answers only, and reference log-probs."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for row in range(2 * PAIRS):
        start = 3 + row % 3
        end = start + 1 + int(torch.randint(0, LENGTH - start - 1, (1,), generator=generator))
        mask[row, start:end] = 1
    per_token = -torch.rand(2 * PAIRS, LENGTH - 1, generator=generator, dtype=torch.float64) * 3 * mask[:, 1:]
    return {
        "input_ids": torch.randint(0, 50, (2 * PAIRS, LENGTH), generator=generator),
        "attention_mask": torch.ones(2 * PAIRS, LENGTH, dtype=torch.long),
        "completion_mask": mask,
        "per_token": per_token,
        "ref_chosen_logps": -torch.rand(PAIRS, generator=generator, dtype=torch.float64) * 20,
        "ref_rejected_logps": -torch.rand(PAIRS, generator=generator, dtype=torch.float64) * 20,
    }


def trl_dpo(inputs: dict[str, torch.Tensor], loss: str, beta: float) -> tuple[float, dict[str, float]]:
    """TRL's loss and metrics for one batch with precomputed reference log-probs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    model = GivenLogps(inputs["per_token"]).train()
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    given = {k: v for k, v in inputs.items() if k != "per_token"}
    value = DPOTrainer._compute_loss(trainer, model, given, return_outputs=False)
    return float(value), {name: values[-1] for name, values in trainer._metrics["train"].items()}


def swapped(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same pairs with chosen and rejected exchanged."""

    def halves(t: torch.Tensor) -> torch.Tensor:
        first, second = t.chunk(2)
        return torch.cat([second, first])

    out = {k: halves(inputs[k]) for k in ("input_ids", "attention_mask", "completion_mask", "per_token")}
    return {**out, "ref_chosen_logps": inputs["ref_rejected_logps"], "ref_rejected_logps": inputs["ref_chosen_logps"]}


def kiln_dpo(inputs: dict[str, torch.Tensor], loss: str, beta: float, label_smoothing: float = 0.0):
    """Kiln's loss (mean over the pairs) and metrics for the same batch."""
    chosen, rejected = inputs["per_token"].sum(dim=1).chunk(2)
    chosen_tokens, rejected_tokens = inputs["completion_mask"].sum(dim=1).chunk(2)
    scores = preference_loss(
        chosen,
        rejected,
        inputs["ref_chosen_logps"],
        inputs["ref_rejected_logps"],
        chosen_tokens,
        rejected_tokens,
        loss=loss,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    return float(scores.losses.mean()), pair_metrics(pair_sums(scores, chosen, rejected), PAIRS, "train")


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_each_loss_and_every_reward_metric_equal_trls_to_1e_6(loss, beta):
    for seed in range(3):
        inputs = batch(seed)
        trl_loss, trl_metrics = trl_dpo(inputs, loss, beta)
        kiln_loss, kiln_metrics = kiln_dpo(inputs, loss, beta)
        assert kiln_loss == pytest.approx(trl_loss, abs=1e-6, rel=1e-6)
        assert trl_loss > 0
        for name in PAIR_STATS:
            assert kiln_metrics[f"train/{name}"] == pytest.approx(trl_metrics[name], abs=1e-6), name


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_conservative_dpo_is_the_smoothed_mixture_of_trls_loss_on_the_pair_and_on_it_swapped(label_smoothing):
    inputs = batch(7)
    forward, _ = trl_dpo(inputs, "sigmoid", 0.1)
    backward, _ = trl_dpo(swapped(inputs), "sigmoid", 0.1)
    kiln_loss, kiln_metrics = kiln_dpo(inputs, "sigmoid", 0.1, label_smoothing)
    assert kiln_loss == pytest.approx((1 - label_smoothing) * forward + label_smoothing * backward, abs=1e-9)
    assert kiln_metrics == kiln_dpo(inputs, "sigmoid", 0.1)[1]  # smoothing leaves the rewards alone


def test_answer_logps_sums_the_log_softmax_of_each_masked_token_at_the_position_before_it():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=generator)
    tokens = torch.randint(0, 11, (3, 6), generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    expected = torch.zeros(3)
    for row in range(3):
        for t in range(1, 6):
            if mask[row, t]:
                expected[row] += torch.log_softmax(logits[row, t - 1], dim=-1)[tokens[row, t]]
    torch.testing.assert_close(answer_logps(logits, tokens, mask), expected)


def test_an_unknown_loss_is_refused_naming_the_choices():
    ones = torch.ones(2)
    with pytest.raises(ValueError, match="dpo.loss must be one of sigmoid, ipo, hinge; got 'kto'"):
        preference_loss(ones, ones, ones, ones, ones, ones, loss="kto", beta=0.1)


def test_a_tie_is_not_a_reward_win_and_rewards_carry_no_gradient():
    chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -3.0], requires_grad=True)
    ref = torch.zeros(2)
    scores = preference_loss(chosen, rejected, ref, ref, torch.ones(2), torch.ones(2), loss="sigmoid", beta=0.1)
    assert not scores.chosen_rewards.requires_grad and scores.losses.requires_grad
    metrics = pair_metrics(pair_sums(scores, chosen, rejected), 2, "val")
    assert metrics["val/rewards/accuracies"] == 0.5  # pair 1 ties, pair 2 wins
    assert metrics["val/rewards/margins"] == pytest.approx(0.05)
