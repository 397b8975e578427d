"""FLOPs per token by architecture: grouped-query attention, SwiGLU, routed experts and looked-up embeddings counted
as each model multiplies them, checked against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, Qwen3MoeConfig

from trainers.config import ModelConfig
from trainers.flops import (
    attention_width,
    decoder_matmul_params,
    flops_per_token,
    model_flops_per_token,
    params_less_lookups,
)
from trainers.models import arch_config, build_from_config, build_gpt2, build_masked_lm

# Llama 3 8B: hidden 4096, 32 layers, 32 query heads and 8 key/value heads of 128, SwiGLU 14336, 128256 tokens.
LLAMA3_8B = ModelConfig(
    arch="llama",
    n_layer=32,
    n_head=32,
    n_kv_head=8,
    n_embd=4096,
    intermediate_size=14336,
    n_positions=8192,
    vocab_size=128256,
)


def test_llama3_8b_by_hand_and_beside_torchtitans_formula():
    config = arch_config(LLAMA3_8B, vocab_size=128256, eos_id=0)
    attention = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096  # q, k and v (8 heads of 128 = 1024 wide), output
    mlp = 3 * 4096 * 14336  # gate, up, down
    head = 4096 * 128256  # the untied output head multiplies; the input embedding is looked up
    assert decoder_matmul_params(config, head_outputs=128256) == 32 * (attention + mlp) + head == 7_504_658_432
    with torch.device("meta"):
        model = build_from_config("AutoModelForCausalLM", LLAMA3_8B, 128256, 0)
    attention_flops = 12 * 32 * 32 * 128 * 8192  # 12 L H Q T
    ours = model_flops_per_token(model, seq_len=8192)
    assert ours == 6 * 7_504_658_432 + attention_flops == 57_912_852_480
    # torchtitan's llama3: 6 x (parameters - the token embedding) + 12 L H Q T. It also counts the 65 RMSNorm
    # weight vectors (32 x 2 + 1 of 4096), which scale rather than multiply: 6 x 266,240 FLOPs more.
    titan = 6 * (sum(p.numel() for p in model.parameters()) - 128256 * 4096) + attention_flops
    assert titan - ours == 6 * 65 * 4096 and titan == 57_914_449_920


def test_an_moe_layer_counts_the_routed_experts_and_the_router_only():
    # Mixtral 8x7B: its "12.9B active parameters" are these matmuls plus the 32000 x 4096 input embedding.
    mixtral = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32)
    routed = 2 * 3 * 4096 * 14336 + 4096 * 8  # 2 of 8 experts, and the router scoring all 8
    attention = 2 * 4096 * 4096 + 2 * 4096 * 1024
    active = decoder_matmul_params(mixtral, head_outputs=32000)
    assert active == 32 * (attention + routed) + 4096 * 32000
    assert active + 32000 * 4096 == pytest.approx(12.9e9, rel=0.01)
    # Qwen3-MoE: a layer in mlp_only_layers is a dense MLP intermediate_size wide.
    sizes = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    qwen = Qwen3MoeConfig(num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32, **sizes)
    qwen.num_experts, qwen.num_experts_per_tok, qwen.mlp_only_layers = 4, 2, [0]
    attention = 64 * 64 + 2 * 64 * 32 + 64 * 64
    dense, sparse = 3 * 64 * 96, 2 * 3 * 64 * 32 + 64 * 4
    assert decoder_matmul_params(qwen, head_outputs=10) == 2 * attention + dense + sparse + 64 * 10


def test_wide_heads_count_their_own_width_in_attention():
    config = arch_config(
        ModelConfig(arch="qwen3", n_layer=1, n_head=16, n_kv_head=8, head_dim=128, n_embd=1024), 100, 0
    )
    assert attention_width(config) == 2048
    q_k_v_o = 1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024
    assert decoder_matmul_params(config, head_outputs=128) == q_k_v_o + 3 * 1024 * config.intermediate_size + 1024 * 128


def test_gpt2_counts_as_before_and_bert_leaves_out_its_lookups():
    gpt2 = build_gpt2(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64), vocab_size=300, eos_id=0)
    before = sum(p.numel() for p in gpt2.parameters()) - gpt2.transformer.wpe.weight.numel()  # wte is the head
    assert model_flops_per_token(gpt2, seq_len=64) == flops_per_token(before, 2, 32, 64)
    bert = build_masked_lm(ModelConfig(arch="bert", n_layer=2, n_head=2, n_embd=32, n_positions=64), 300, 0)
    embeddings = bert.bert.embeddings
    lookups = embeddings.position_embeddings.weight.numel() + embeddings.token_type_embeddings.weight.numel()
    assert params_less_lookups(bert) == sum(p.numel() for p in bert.parameters()) - lookups  # word: tied to the head


def test_a_decoder_classifier_counts_its_class_head_not_a_vocabulary():
    shape = ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=32, intermediate_size=64, n_positions=64)
    model = build_from_config("AutoModelForSequenceClassification", shape, 300, 0, num_labels=3)
    n_params = 4 * 32 * 32 + 3 * 32 * 64 + 32 * 3
    assert model_flops_per_token(model, seq_len=64) == flops_per_token(n_params, 1, 32, 64)
