"""Direct Preference Optimization's arithmetic (Rafailov et al., 2023), as TRL 1.16's DPOTrainer computes it.

A pair is a prompt with a chosen and a rejected answer. Each answer's log-probability under the model is the sum
of its tokens' log-probabilities (`answer_logps`, for every loss, IPO included), and the reference model's the
same sum under the frozen initial model. With the log-ratios r_c = logp_c - ref_c and r_r = logp_r - ref_r and
d = r_c - r_r, each pair's loss is

- sigmoid: -(1 - eps) logsigmoid(beta d) - eps logsigmoid(-beta d)   (eps = label_smoothing: conservative DPO)
- hinge:   max(0, 1 - beta d)                                         (SLiC)
- ipo:     (r_c / n_c - r_r / n_r - 1 / (2 beta))^2  (IPO, each log-ratio per answer token, as TRL normalises it)

and the rewards are beta r_c and beta r_r (detached). tests/unit/test_preference_loss.py checks every formula and
metric against TRL's own `DPOTrainer._compute_loss`. (TRL 1.x dropped label smoothing from its sigmoid loss;
eps > 0 is checked against the identity (1 - eps) L(c, r) + eps L(r, c), which is what TRL up to 0.28 computed.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge")
IGNORE_INDEX = -100

# The per-pair statistics a step or an evaluation sums (over micro-batches and ranks) before dividing by the
# number of pairs: TRL's metric names.
PAIR_STATS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True)
class PairScores:
    """One value per pair: its loss (with gradient) and the two rewards (without)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def answer_logps(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its masked tokens (token t scored at position t - 1), in fp32."""
    targets = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    flat = logits[:, :-1].float()  # fp32 log-softmax, as transformers computes its loss
    per_token = -F.cross_entropy(flat.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum(dim=1)


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    loss: str,
    beta: float,
    label_smoothing: float = 0.0,
) -> PairScores:
    """Each pair's DPO loss and rewards from the summed answer log-probs of the policy and the reference; the
    token counts (each answer's length) are read by ipo only."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss == "ipo":
        chosen_mean = chosen_ratio / chosen_tokens.clamp(min=1)
        rejected_mean = rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (chosen_mean - rejected_mean - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    return PairScores(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def pair_sums(scores: PairScores, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """The PAIR_STATS of a micro-batch summed over its pairs, in that order (float64, without gradient): summed
    over micro-batches and ranks, then divided by the pairs, they are TRL's means."""
    chosen, rejected = scores.chosen_rewards, scores.rejected_rewards
    columns = (
        chosen,
        rejected,
        (chosen > rejected).to(chosen.dtype),  # a tie is not a win, as in TRL
        chosen - rejected,
        chosen_logps.detach(),
        rejected_logps.detach(),
    )
    return torch.stack([c.double().sum() for c in columns])


def pair_metrics(sums: torch.Tensor, pairs: float, prefix: str) -> dict[str, float]:
    """`prefix/rewards/...` and `prefix/logps/...`: the PAIR_STATS sums as means over pairs."""
    return {f"{prefix}/{name}": float(value) / pairs for name, value in zip(PAIR_STATS, sums.tolist(), strict=True)}
