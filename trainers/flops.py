"""Model FLOPs utilisation: achieved model FLOPs per second over the hardware's peak.

A model's FLOPs per token (`model_flops_per_token`) count the matmul weights one token goes through: for Llama's
family a pure function of the transformers config (`decoder_matmul_params`: grouped-query attention's narrower key and
value projections, SwiGLU's three MLP matrices, only the experts a token is routed to), for other models their
parameters less the embeddings that are looked up rather than multiplied (`params_less_lookups`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The transformers model_type values decoder_matmul_params knows (trainers/models.py DECODER_CONFIGS builds them).
LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral")

# Dense bf16/fp16 tensor-core peaks (no sparsity), per GPU, from the vendors' data sheets.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * d * T.

    PaLM's model-FLOPs formula (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways",
    appendix B): 6N + 12LHQT for N parameters, L layers, H heads of width Q (d = H * Q, the attention width: the
    model width unless the heads are wider, as Qwen3-0.6B's) and sequence length T. 6N is Kaplan et al. 2020's count
    ("Scaling Laws for Neural Language Models", section 2.1): each parameter costs one multiply-add (2 FLOPs) per
    token forward and two backward. 12LdT adds the attention products QK^T and attention x V, 2 * 2 * d * T FLOPs per
    token and layer forward, times 3 for forward and backward; grouped key/value heads do not shrink it (every query
    head still scores every position). Activation recomputation is not counted (model FLOPs, not hardware FLOPs), nor
    is causal masking's skipped half. N should exclude the embeddings that are looked up, not multiplied (the
    position embeddings, an untied input embedding).
    """
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def attention_width(config: PretrainedConfig) -> int:
    """H * Q: query heads times their width (config.head_dim where the config has one, else hidden / heads)."""
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def decoder_matmul_params(config: PretrainedConfig, head_outputs: int) -> int | None:
    """The matmul weights one token goes through in a Llama-family transformers model: every layer's attention
    and MLP (an MoE layer's routed experts and router) and the head (head_outputs wide: the vocabulary, or the classes
    of a classifier); None for a model_type outside LLAMA_FAMILY. Norms and biases are not matmuls: left out."""
    if getattr(config, "model_type", None) not in LLAMA_FAMILY:
        return None
    d, q = config.hidden_size, attention_width(config)
    kv = config.num_key_value_heads * (q // config.num_attention_heads)
    attention = d * q + 2 * d * kv + q * d  # q, k, v and output projections: k and v narrower with GQA
    layers = range(config.num_hidden_layers)
    return sum(attention + mlp_matmul_params(config, layer) for layer in layers) + d * head_outputs


def mlp_matmul_params(config: PretrainedConfig, layer: int) -> int:
    """One layer's SwiGLU matmul weights per token (gate, up and down: 3 x hidden x width); in an MoE layer those of
    the experts_per_token experts a token is routed to, plus the router's hidden x n_experts."""
    d, model_type = config.hidden_size, config.model_type
    if model_type == "mixtral":
        return config.num_experts_per_tok * 3 * d * config.intermediate_size + d * config.num_local_experts
    sparse = model_type == "qwen3_moe" and config.num_experts > 0 and layer not in config.mlp_only_layers
    if sparse and (layer + 1) % config.decoder_sparse_step == 0:  # Qwen3MoeDecoderLayer's own test
        return config.num_experts_per_tok * 3 * d * config.moe_intermediate_size + d * config.num_experts
    return 3 * d * config.intermediate_size


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection onto the vocabulary (transformers' get_output_embeddings); None for a
    classifier's model, whose head is its score."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def params_less_lookups(model: nn.Module) -> int:
    """The model's parameters (tied ones once) less those of its embeddings that are only looked up: an embedding
    tied to the output head is multiplied there, so it stays (GPT-2's wte stays, its wpe goes)."""
    multiplied = getattr(output_head(model), "weight", None)
    lookups = {
        id(module.weight): module.weight.numel()
        for module in model.modules()
        if isinstance(module, nn.Embedding) and module.weight is not multiplied
    }
    return sum(p.numel() for p in model.parameters()) - sum(lookups.values())


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of a transformers model (6 N + 12 L d T) at sequence length seq_len, N counted by
    decoder_matmul_params where it knows the model_type, else params_less_lookups."""
    config: PretrainedConfig = model.config
    head = output_head(model)  # a projection: its weight is (outputs, hidden)
    head_outputs = cast(torch.Tensor, head.weight).shape[0] if head is not None else getattr(config, "num_labels", 0)
    n_params = decoder_matmul_params(config, head_outputs)
    if n_params is None:
        n_params = params_less_lookups(model)
    return flops_per_token(n_params, config.num_hidden_layers, attention_width(config), seq_len)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU, matched by name; None when unknown (CPUs included)."""
    best = None
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_name.lower() and (best is None or len(key) > len(best[0])):
            best = (key, value)
    return best[1] if best else None


def mfu(tokens_per_s: float, flops_per_token_: float, peak_per_device: float, devices: int) -> float:
    """Fraction of the devices' peak FLOPs that the model's math used."""
    return tokens_per_s * flops_per_token_ / (peak_per_device * devices)


def tflops_per_device(tokens_per_s: float, flops_per_token_: float, devices: int) -> float:
    """Model TFLOP/s each device achieved (the MFU numerator; known without a peak, so logged on CPUs too)."""
    return tokens_per_s * flops_per_token_ / devices / 1e12
