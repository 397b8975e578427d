"""Models built from config. They know nothing about parallelism or storage.

`model.arch` picks the transformers config (`gpt2_config`, `bert_config`, `decoder_config` for Llama's family and
the two MoE families); a task picks the head by naming the transformers Auto class that builds it
(`build_from_config`), as a `model.init_from` folder is loaded. An MoE model's router is read back from its
output: `router_aux_loss` for a task that computes its own loss, `watch_router` for the logged expert load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import transformers
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from trainers.config import MOE_ARCHS, ModelConfig

if TYPE_CHECKING:
    from transformers.utils import ModelOutput

# model.arch -> the transformers config class of a RoPE / RMSNorm / SwiGLU decoder (trainers/config/model.py)
DECODER_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
    "qwen3_moe": Qwen3MoeConfig,
    "mixtral": MixtralConfig,
}


def padded_vocab(tokenizer_vocab: int, multiple: int = 64) -> int:
    """The tokenizer's vocabulary rounded up to a multiple (faster matmuls, same tokens)."""
    return -(-tokenizer_vocab // multiple) * multiple


def gpt2_config(cfg: ModelConfig, vocab_size: int, eos_id: int, **extra: object) -> GPT2Config:
    """A transformers GPT2Config from ours (extra: further GPT2Config fields, e.g. num_labels)."""
    return GPT2Config(
        vocab_size=cfg.vocab_size or padded_vocab(vocab_size),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        use_cache=False,
        **extra,
    )


def bert_config(cfg: ModelConfig, vocab_size: int, eos_id: int, **extra: object) -> BertConfig:
    """A transformers BertConfig from ours: n_embd is the hidden size, the feed-forward 4 x n_embd wide."""
    return BertConfig(
        vocab_size=cfg.vocab_size or padded_vocab(vocab_size),
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=4 * cfg.n_embd,
        max_position_embeddings=cfg.n_positions,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        # BERT's embedding keeps its pad row at zero and never trains it. The default pad id 0 is a real token
        # in a tokenizer whose EOS is elsewhere; EOS is a separator that is never a target, so it pads.
        pad_token_id=eos_id,
        eos_token_id=eos_id,
        use_cache=False,
        **extra,
    )


def swiglu_width(n_embd: int, multiple: int = 256) -> int:
    """LLaMA's SwiGLU hidden width: 2/3 of 4 x n_embd (three matrices cost what two 4 x n_embd ones would), rounded
    up to a multiple (Touvron et al. 2023, "LLaMA", section 2; `multiple_of` in Meta's llama model.py)."""
    return -(-(8 * n_embd // 3) // multiple) * multiple


def decoder_config(cfg: ModelConfig, vocab_size: int, eos_id: int, **extra: object) -> PretrainedConfig:
    """A Llama-family transformers config of model.arch from ours (extra: further config fields, e.g. num_labels).

    Unset keys take the defaults trainers/config/model.py's ModelConfig names. Dropout is attention dropout, the only
    dropout these decoders have.
    """
    fields: dict[str, Any] = {
        "vocab_size": cfg.vocab_size or padded_vocab(vocab_size),
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.head_dim or cfg.n_embd // cfg.n_head,
        "intermediate_size": cfg.intermediate_size or swiglu_width(cfg.n_embd),
        "max_position_embeddings": cfg.n_positions,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": False,
    }
    if cfg.rope_theta is not None:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.norm_eps is not None:
        fields["rms_norm_eps"] = cfg.norm_eps
    if cfg.arch == "mistral":
        fields["sliding_window"] = None  # full attention (Mistral 7B from v0.2 on), as the FLOPs count assumes
    if cfg.arch in MOE_ARCHS:
        fields.update(moe_fields(cfg, fields["intermediate_size"]))
    return DECODER_CONFIGS[cfg.arch](**fields, **extra)


def moe_fields(cfg: ModelConfig, expert_width: int) -> dict[str, object]:
    """The config fields of an MoE arch's experts and router, named as its transformers config names them."""
    experts, per_token = cfg.experts
    fields: dict[str, object] = {
        "num_experts_per_tok": per_token,
        # transformers then adds router_aux_loss_coef x the load-balancing loss to the loss it computes from labels.
        "output_router_logits": True,
    }
    if cfg.router_aux_loss_coef is not None:
        fields["router_aux_loss_coef"] = cfg.router_aux_loss_coef
    if cfg.arch == "mixtral":
        return {**fields, "num_local_experts": experts}
    # Every layer sparse, each expert intermediate_size wide; top-k weights renormalised as the published Qwen3 MoE
    # models do (transformers' default, False, is Qwen2-MoE's).
    return {
        **fields,
        "num_experts": experts,
        "moe_intermediate_size": expert_width,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


ARCH_CONFIGS = {"gpt2": gpt2_config, "bert": bert_config, **dict.fromkeys(DECODER_CONFIGS, decoder_config)}


def arch_config(cfg: ModelConfig, vocab_size: int, eos_id: int, **extra: object) -> PretrainedConfig:
    """The transformers config of model.arch."""
    return ARCH_CONFIGS[cfg.arch](cfg, vocab_size, eos_id, **extra)


def build_from_config(
    auto_class: str, cfg: ModelConfig, vocab_size: int, eos_id: int, **extra: object
) -> PreTrainedModel:
    """A freshly initialised model of model.arch with the head `auto_class` builds (e.g. AutoModelForMaskedLM),
    weights from the current torch RNG state; extra: further config fields (e.g. num_labels)."""
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({vocab_size}); raise it or leave it unset"
        )
    config = arch_config(cfg, vocab_size, eos_id, **extra)
    model = getattr(transformers, auto_class).from_config(config, attn_implementation=cfg.attn_implementation)
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_gpt2(cfg: ModelConfig, vocab_size: int, eos_id: int) -> PreTrainedModel:
    """A freshly initialised causal LM of model.arch (GPT2LMHeadModel for arch=gpt2, LlamaForCausalLM for llama)."""
    return build_from_config("AutoModelForCausalLM", cfg, vocab_size, eos_id)


def build_masked_lm(cfg: ModelConfig, vocab_size: int, eos_id: int) -> PreTrainedModel:
    """A freshly initialised masked LM of model.arch (BertForMaskedLM for arch=bert)."""
    return build_from_config("AutoModelForMaskedLM", cfg, vocab_size, eos_id)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: its one list of `num_hidden_layers` modules of one class
    (GPT-2's transformer.h, BERT's bert.encoder.layer).

    Found by shape rather than by name or `_no_split_modules`, which BERT leaves unset, so any architecture
    (and a model wrapped by peft) works without a table here.
    """
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) == layers and len({type(m) for m in module}) == 1
    ]
    if len(lists) != 1:
        raise ValueError(
            f"FSDP2 cannot tell the blocks of {type(model).__name__}: it has {len(lists)} lists of "
            f"config.num_hidden_layers={layers} modules of one class, not 1"
        )
    return list(lists[0])


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place (model.compile), before any strategy wraps the model.

    Per block, as torchtitan does (torchtitan/distributed/compile.py): the blocks share one structure, so one
    compilation serves them all, and FSDP2 wraps each compiled block as its own unit. `Module.compile` keeps the
    module and its parameter names (no `_orig_mod.` prefix), so checkpoints and exports are the uncompiled model's.
    Not fullgraph: a block loaded from a folder or wrapped by peft may hold a construct dynamo splits, which costs
    speed rather than failing the run. With model.activation_checkpointing, transformers checkpoints each block's
    forward (GradientCheckpointingLayer) inside the compiled call, so the checkpoint is compiled with the block,
    torchtitan's order (activation checkpointing, then compile, then FSDP).
    """
    for block in transformer_blocks(model):
        block.compile()


def parameter_count(model) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def router_aux_loss(output: ModelOutput, model: nn.Module) -> torch.Tensor | None:
    """The routers' load-balancing loss times config.router_aux_loss_coef, for a task that computes its loss from the
    logits to add (transformers adds it only to the loss it computes from labels); None for a dense model's output.

    model may be a strategy's wrapper (DDP and DeepSpeed keep the transformers model as `.module`).
    """
    aux = getattr(output, "aux_loss", None)
    if aux is None:
        return None
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    return getattr(config, "router_aux_loss_coef", 0.0) * aux


def expert_tokens(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """(MoE layers, experts): how many tokens each layer's router sent to each expert, its top_k logits per token.

    Counted on the device (scatter_add, no bincount: nothing is read back), float64 so long windows add exactly.
    """
    rows = []
    for logits in router_logits:
        chosen = logits.detach().topk(top_k, dim=-1).indices.reshape(-1)
        counts = torch.zeros(logits.shape[-1], dtype=torch.float64, device=logits.device)
        rows.append(counts.scatter_add_(0, chosen, torch.ones_like(chosen, dtype=torch.float64)))
    return torch.stack(rows)


def watch_router(model: nn.Module, record: Callable[[torch.Tensor, torch.Tensor], None]) -> RemovableHandle | None:
    """After each training-mode forward of an MoE model that returns its routers' logits, call record(load-balancing
    loss, expert_tokens) with device tensors; None (nothing watched) for any other model.

    A hook on the whole model, not on the routers: activation checkpointing reruns each layer's forward (and a
    router hook with it) during backward, the model's own forward runs once. Evaluation runs in eval mode: skipped.
    """
    config = getattr(model, "config", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not top_k or not getattr(config, "output_router_logits", False):
        return None

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        logits, aux = getattr(output, "router_logits", None), getattr(output, "aux_loss", None)
        if module.training and logits and aux is not None:
            record(aux.detach(), expert_tokens(logits, top_k))

    return model.register_forward_hook(hook)
