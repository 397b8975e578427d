"""An MoE model's router, read back: the load-balancing loss a task adds to a loss of its own, and the logged expert
load, counted on the device after training forwards only and summed over a window and the ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers.config import ModelConfig
from trainers.models import build_from_config, build_gpt2, expert_tokens, router_aux_loss, watch_router
from trainers.step_window import FIELDS, StepWindow, busiest_expert_ratio, summarize

MOE = ModelConfig(arch="qwen3_moe", n_layer=2, n_head=2, n_embd=32, n_positions=64, n_experts=4, experts_per_token=2)


def moe_model(cfg: ModelConfig = MOE) -> nn.Module:
    torch.manual_seed(0)
    return build_from_config("AutoModelForCausalLM", cfg, vocab_size=300, eos_id=0)


class Wrapper(nn.Module):
    """What DDP and DeepSpeed hand a task: the transformers model as `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_loss_from_the_logits_plus_router_aux_loss_is_transformers_loss(arch):
    """What task=sft must do: its own cross entropy, plus router_aux_loss(output, model)."""
    model = moe_model(ModelConfig(**{**MOE.__dict__, "arch": arch, "router_aux_loss_coef": 0.5}))
    ids = torch.randint(0, 300, (2, 16))
    own = model(input_ids=ids)
    cross_entropy = F.cross_entropy(own.logits[:, :-1].reshape(-1, own.logits.shape[-1]), ids[:, 1:].reshape(-1))
    aux = router_aux_loss(own, Wrapper(model))
    assert aux is not None and aux.requires_grad
    torch.testing.assert_close(cross_entropy + aux, model(input_ids=ids, labels=ids).loss)
    torch.testing.assert_close(aux, 0.5 * own.aux_loss)


def test_a_dense_model_has_no_router_loss_and_is_not_watched():
    gpt2 = build_gpt2(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32), 300, 0)
    assert router_aux_loss(gpt2(input_ids=torch.randint(0, 300, (1, 8))), gpt2) is None
    assert watch_router(gpt2, lambda aux, tokens: None) is None
    llama = build_from_config("AutoModelForCausalLM", ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=16), 9, 0)
    assert watch_router(llama, lambda aux, tokens: None) is None


def test_expert_tokens_counts_each_tokens_top_k_per_layer():
    logits = (torch.tensor([[3.0, 2.0, 0.0], [0.0, 2.0, 3.0]]), torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]]))
    counts = expert_tokens(logits, top_k=2)
    assert counts.dtype == torch.float64 and counts.tolist() == [[1.0, 2.0, 1.0], [2.0, 0.0, 2.0]]


def test_the_router_is_read_after_training_forwards_only_and_once_with_activation_checkpointing():
    model = moe_model(ModelConfig(**{**MOE.__dict__, "activation_checkpointing": True}))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    assert watch_router(model, lambda aux, tokens: seen.append((aux, tokens))) is not None
    ids = torch.randint(0, 300, (2, 16))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # the layers' forwards run again in backward: not recorded
    assert len(seen) == 1
    aux, tokens = seen[0]
    assert not aux.requires_grad and tokens.shape == (2, 4)  # (MoE layers, experts)
    assert tokens.sum(dim=1).tolist() == [2 * 16 * 2] * 2  # every token, to 2 experts, in each layer
    with torch.no_grad():
        model.eval()(input_ids=ids)
    assert len(seen) == 1


def test_the_window_sums_the_router_and_the_ranks_agree_on_its_load():
    window = StepWindow(torch.device("cpu"))
    assert window.experts == 0 and window.router_columns() == []
    window.add_router(torch.tensor(2.0), torch.tensor([[3.0, 1.0], [2.0, 2.0]], dtype=torch.float64))
    window.add_router(torch.tensor(4.0), torch.tensor([[1.0, 3.0], [0.0, 4.0]], dtype=torch.float64))
    aux, tokens = window.router_columns()
    assert window.experts == 2 and float(aux) == 3.0 and tokens.tolist() == [4.0, 4.0, 2.0, 6.0]
    window.open()
    assert window.experts == 2 and float(window.router_columns()[1].sum()) == 0.0  # same shape, a new window
    base = [1.0] * len(FIELDS)
    summary = summarize([[*base, 3.0, 4.0, 4.0, 2.0, 6.0], [*base, 1.0, 0.0, 0.0, 0.0, 8.0]], experts=2)
    assert summary.moe_aux_loss == 2.0
    assert summary.expert_load_max_over_mean == 14.0 / 8.0  # layer 2: 2 and 14 tokens, mean 8
    assert summarize([base, base]).moe_aux_loss is None  # a dense model's rows


def test_a_balanced_router_is_one_and_a_collapsed_one_is_the_number_of_experts():
    assert busiest_expert_ratio([5.0, 5.0, 5.0, 5.0], experts=4) == 1.0
    assert busiest_expert_ratio([0.0, 0.0, 20.0, 1.0, 1.0, 1.0], experts=3) == 3.0  # the worst layer
