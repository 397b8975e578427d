"""Models that start from a Hugging Face folder (`model.init_from`): checked on the driver, loaded on every rank.

The driver calls `inspect_folder` and `check_data` before any worker starts, so a missing folder, a folder
that is not a model of the task's kind, or a tokenizer the data was not prepared with fails as one line.
Every rank then calls `load_pretrained` on the same files before its strategy wraps the model, so all
ranks start from identical weights. Nothing is downloaded (local_files_only), and only safetensors are
read (no pickles).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from data_pipeline import storage
from data_pipeline import tokenizer as bpe

if TYPE_CHECKING:  # transformers is imported where a model is read, not with this module
    from transformers import PretrainedConfig, PreTrainedModel

    from trainers.config import ModelConfig

CONFIG_FILE = "config.json"
# The files besides *.safetensors that a model folder is loaded from (config, tokenizer, generation).
MODEL_FILES = frozenset(
    {
        CONFIG_FILE,
        "generation_config.json",
        bpe.TOKENIZER_FILE,
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)


# Auto classes whose head may be new: loading a language model folder keeps its body and initialises the head.
NEW_HEAD_CLASSES = frozenset({"AutoModelForSequenceClassification"})


class PretrainedError(ValueError):
    """A model.init_from source that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class FolderModel:
    """What the driver needs to know of a Hugging Face model folder, read without loading its weights."""

    path: str
    architecture: str  # e.g. GPT2LMHeadModel
    vocab_size: int | None  # rows of its token embedding
    positions: int | None  # the longest sequence it takes, if its config says
    tokenizer_vocab: dict[str, int]


def model_classes(auto_class: str) -> dict[str, tuple[str, ...]]:
    """model_type -> the class names `auto_class` builds for it (transformers' own table, no import of torch)."""
    from transformers.models.auto import modeling_auto

    tables = {
        "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "AutoModelForMaskedLM": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }
    return {kind: (names,) if isinstance(names, str) else tuple(names) for kind, names in tables[auto_class].items()}


def inspect_folder(path: str, auto_class: str, task: str, name: str | None = None) -> FolderModel:
    """Check that path is a Hugging Face folder `auto_class` loads for `task`, with weights and a tokenizer."""
    name = name or f"model.init_from={path}"
    hint = "give a local Hugging Face model folder (e.g. from `kiln export RUN --out DIR`) or run:RUN[@STEP]"
    if not os.path.isdir(path):
        raise PretrainedError(f"{name}: no such folder; {hint}")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise PretrainedError(f"{name} is not a Hugging Face model folder (no {CONFIG_FILE}); {hint}")
    config = read_config(path, name)
    kinds = model_classes(auto_class)
    architectures = list(getattr(config, "architectures", None) or [])
    builds = kinds.get(config.model_type, ())
    # A head Kiln may start new takes any model of a type it builds for (e.g. a classifier on a causal LM's body).
    new_head_ok = auto_class in NEW_HEAD_CLASSES
    if not builds or (architectures and not set(architectures) & set(builds) and not new_head_ok):
        held = ", ".join(architectures) or f"model_type={config.model_type}"
        raise PretrainedError(
            f"{name} holds a {held} model, which task={task} cannot train: it needs a model {auto_class} loads "
            f"(e.g. {', '.join(sorted({n for names in list(kinds.values())[:3] for n in names}))})"
        )
    if not weight_files(path):
        raise PretrainedError(
            f"{name} has no safetensors weights (model.safetensors, or shards with model.safetensors.index.json); "
            "Kiln reads weights only from safetensors: save the model with safe_serialization=True"
        )
    folder = FolderModel(
        path=path,
        architecture=(architectures or list(builds))[0],
        vocab_size=getattr(config, "vocab_size", None),
        positions=getattr(config, "max_position_embeddings", None),
        tokenizer_vocab=tokenizer_vocab(path, name),
    )
    check_embedding(folder, name)
    return folder


def check_embedding(model: FolderModel, name: str) -> None:
    """Every token of the folder's tokenizer needs a row of its model's embedding, or the first batch that holds
    one fails deep inside the model."""
    if model.vocab_size is not None and model.vocab_size < len(model.tokenizer_vocab):
        raise PretrainedError(
            f"{name} embeds {model.vocab_size} tokens but its tokenizer has {len(model.tokenizer_vocab)}: the folder "
            "is inconsistent; save the model with embeddings for every token (model.resize_token_embeddings("
            "len(tokenizer))) or put the tokenizer it was trained with beside it"
        )


def read_config(path: str, name: str) -> PretrainedConfig:
    """The folder's transformers config (config.json), or PretrainedError naming what is wrong with it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise PretrainedError(f"{name}: cannot read its {CONFIG_FILE} ({one_line(exc)})") from None


def model_files(path: str) -> list[str]:
    """Names of the folder's files a model is loaded from: config, safetensors weights (and shard index),
    tokenizer and generation config. Anything else (pickled weights, optimizer state, notes) is left out."""
    return sorted(
        name
        for name in os.listdir(path)
        if os.path.isfile(os.path.join(path, name))
        and (name in MODEL_FILES or name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))
    )


def weight_files(path: str) -> list[str]:
    """The folder's safetensors weights (one file, or shards)."""
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def tokenizer_vocab(path: str, name: str) -> dict[str, int]:
    """The vocabulary of the folder's tokenizer, as transformers reads it (added tokens included)."""
    try:
        return dict(bpe.load(path).get_vocab())
    except bpe.TokenizerError as exc:
        raise PretrainedError(f"{name}: {exc}; the data must be prepared with the model's own tokenizer") from None


def check_vocabulary(
    name: str, model_vocab: dict[str, int], data_url: str, data_vocab: dict[str, int], tokenizer_at: str
) -> None:
    """The data must have been tokenized with the model's tokenizer (in folder tokenizer_at), else its ids
    mean other tokens."""
    if model_vocab == data_vocab:
        return
    detail = "the same size, other tokens" if len(model_vocab) == len(data_vocab) else f"{len(data_vocab)} tokens"
    raise PretrainedError(
        f"the tokenizer of {name} (vocabulary of {len(model_vocab)} tokens) is not the one the data at {data_url} was "
        f"prepared with (vocabulary of {detail}): prepare the data with the model's tokenizer "
        f"(kiln prepare tokenizer={tokenizer_at} ...)"
    )


def check_data(model: FolderModel, name: str, data_url: str, data_vocab: dict[str, int], seq_len: int) -> None:
    """The folder's model fits the data: the same tokenizer, room for every token id and for data.seq_len."""
    check_vocabulary(name, model.tokenizer_vocab, data_url, data_vocab, model.path)
    if model.positions is not None and seq_len > model.positions:
        raise PretrainedError(
            f"data.seq_len={seq_len} is longer than {name} takes ({model.positions} positions); prepare and train "
            f"with data.seq_len<={model.positions}"
        )


def folder_labels(config: PretrainedConfig) -> list[str] | None:
    """A sequence-classification folder's class names in id order (config.json id2label); None for other models
    (a language model's config carries transformers' placeholder labels, which mean nothing)."""
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        return None
    id2label = {int(i): str(name) for i, name in (config.id2label or {}).items()}
    return [id2label[i] for i in sorted(id2label)]


def check_folder_labels(path: str, name: str, labels: list[str]) -> None:
    """A sequence-classification folder must classify into the data's classes (a language model gets a new head)."""
    held = folder_labels(read_config(path, name))
    if held is not None and held != list(labels):
        raise PretrainedError(
            f"{name} classifies into {held} but the data's label map is {list(labels)}: start from a model trained on "
            "these labels, or from a language model folder (its classification head is then new)"
        )


def load_pretrained(url: str, auto_class: str, cfg: ModelConfig, **config: object) -> PreTrainedModel:
    """The folder's model with its weights, in fp32 and training mode (every rank loads the same files).

    cfg is the ModelConfig: its attn_implementation and activation_checkpointing still apply. config: fields
    set on the model's config (e.g. num_labels and id2label for a new classification head).
    """
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not storage.is_local(url):
        with storage.local_folder(url) as folder:
            return load_pretrained(folder, auto_class, cfg, **config)
    if not os.path.isdir(url):
        raise PretrainedError(f"model.init_from={url}: no such folder (it was checked when the run started)")
    try:
        model = getattr(transformers, auto_class).from_pretrained(
            url,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            attn_implementation=cfg.attn_implementation,
            **config,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise PretrainedError(f"model.init_from={url}: cannot load the model ({one_line(exc)})") from None
    model.config.use_cache = False  # training: no generation cache
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()  # from_pretrained returns eval mode: dropout must be on as in a model built from config


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, cut to a readable length."""
    return " ".join(str(exc).split())[:300]
