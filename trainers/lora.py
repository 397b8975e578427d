"""LoRA through peft: adapters on a model.init_from base, and merging them for export.

The base model's weights stay frozen and come from the run's copy of its source (`<run>/init_model`), so a
checkpoint holds only the adapters (and their optimizer state) and the run still stands alone. The
strategies LoRA trains with are trainers/config/training.py's LORA_STRATEGIES, checked when the config is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from trainers.config import LoraConfig

# A sequence classifier's head is new (random) when LoRA starts from a language model: it must train in full.
CLASSIFIER_HEADS = ("score", "classifier")  # GPT2ForSequenceClassification, BertForSequenceClassification

# model_type -> the modules LoRA adapts by default: every linear map of attention and MLP, which learns
# noticeably more than peft's own default for GPT-2 (c_attn alone) at the same rank.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"gpt2": ("c_attn", "c_proj", "c_fc")}


def target_modules(cfg: LoraConfig, model_type: str) -> list[str] | str:
    """The modules to adapt: model.lora.target_modules, or peft's "all-linear" (model.lora.target), else the
    architecture's default (ours, then peft's: q_proj and v_proj for Llama's family)."""
    if cfg.target is not None:
        return cfg.target  # peft matches every linear layer but the output head itself
    if cfg.target_modules is not None:
        return list(cfg.target_modules)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if model_type in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[model_type])
    raise ValueError(
        f"model.lora.target_modules has no default for a {model_type} model; name the linear layers to adapt "
        "(e.g. model.lora.target_modules=[q_proj,v_proj]) or adapt them all (model.lora.target=all-linear)"
    )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """The model with LoRA adapters on its target modules; only the adapters require gradients."""
    import peft

    r = int(cfg.r or 0)
    config: Any = getattr(model, "config", None)
    targets = target_modules(cfg, str(getattr(config, "model_type", "")))
    adapted = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=r,
            lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * r,
            target_modules=targets,
            lora_dropout=cfg.dropout or 0.0,
            bias="none",
            modules_to_save=[name for name in CLASSIFIER_HEADS if hasattr(model, name)] or None,
            fan_in_fan_out=getattr(config, "model_type", None) == "gpt2",  # GPT-2's Conv1D stores (in, out)
        ),
    )
    return adapted


def merged(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapters added into its weights (one process, full weights)."""
    return model.merge_and_unload()  # type: ignore[operator]


def is_lora(model: nn.Module) -> bool:
    """Whether model carries peft adapters."""
    return hasattr(model, "peft_config")


def unwrapped(model: nn.Module) -> nn.Module:
    """The peft model inside a strategy's wrapper (DDP and DeepSpeed keep it as `.module`), or model itself."""
    inner: Any = model
    while not is_lora(inner) and hasattr(inner, "module"):
        inner = inner.module
    return inner


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Inside this block model computes as its base: peft's adapters are bypassed (model may be a strategy's wrapper:
    DDP and DeepSpeed keep the peft model as `.module`). A model without adapters is left as it is."""
    inner = unwrapped(model)
    if not is_lora(inner):
        yield
        return
    with inner.disable_adapter():  # type: ignore[operator]
        yield
