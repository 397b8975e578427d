"""Models built from config. They know nothing about parallelism or storage."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel

from trainers.config import ModelConfig


def padded_vocab(tokenizer_vocab: int, multiple: int = 64) -> int:
    """The tokenizer's vocabulary rounded up to a multiple (faster matmuls, same tokens)."""
    return -(-tokenizer_vocab // multiple) * multiple


def gpt2_config(cfg: ModelConfig, vocab_size: int, eos_id: int) -> GPT2Config:
    """A transformers GPT2Config from ours."""
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
    )


def build_gpt2(cfg: ModelConfig, vocab_size: int, eos_id: int) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 causal LM (weights from the current torch RNG state)."""
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({vocab_size}); raise it or leave it unset"
        )
    model = GPT2LMHeadModel._from_config(
        gpt2_config(cfg, vocab_size, eos_id), attn_implementation=cfg.attn_implementation
    )
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def parameter_count(model) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
