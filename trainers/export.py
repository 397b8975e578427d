"""Checkpoints to Hugging Face folders: consolidate any strategy's shards on one CPU process.

DCP checkpoints (DDP, FSDP2) are read resharded into a plain model; DeepSpeed ZeRO checkpoints are
merged with DeepSpeed's own zero_to_fp32 reader. Neither needs the world size the run trained with.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import nn

from data_pipeline import storage
from data_pipeline import tokenizer as bpe
from data_pipeline.examples import generation_stops
from trainers.checkpoint import safe_load
from trainers.checkpoint.shapes import check_fits, checkpoint_shapes, shapes_of
from trainers.checkpoint.shards import CHECKPOINT_TAG
from trainers.errors import CheckpointError
from trainers.lora import is_lora, merged
from trainers.strategies.dcp_io import frozen_names, load_model_only

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_consolidated(model: nn.Module, shards_url: str, strategy: str) -> None:
    """Fill a plain, single-process model from any strategy's checkpoint shards."""
    check_fits(shapes_of(model), checkpoint_shapes(shards_url, strategy), shards_url)
    if not strategy.startswith("zero"):
        load_model_only(model, shards_url)
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with storage.local_folder(shards_url) as folder, safe_load.deepspeed_reads(shards_url):
        state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=CHECKPOINT_TAG)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied copies are saved once; frozen parameters (a LoRA base) not at all: they come from model.init_from
    tied = {name for name, _ in _tied_names(model)} | frozen_names(model)
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{shards_url}: parameters missing {sorted(set(missing) - tied)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )


def _tied_names(model: nn.Module):
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            yield name, seen[id(param)]
        else:
            seen[id(param)] = name


def save_hugging_face(
    model: PreTrainedModel, tokenizer_url: str, out_dir: str, task: str | None = None, seq_len: int | None = None
) -> list[str]:
    """Write config.json, generation_config.json, model.safetensors and the run's tokenizer; returns the file names.

    The tokenizer is the run's own folder, copied unchanged (special tokens, chat template, model_max_length), so
    the export encodes, chats and stops as the run did. config.json also records the Kiln task the run trained
    (`kiln_task`: an SFT model is a causal LM to transformers, but `kiln eval` scores it on the replies) and its
    sequence length (`kiln_seq_len`: the row length `kiln predict` builds, as the run did); transformers keeps such
    extra fields and ignores them.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = bpe.load(tokenizer_url)
    check_embedding_fits(model, len(tokenizer), tokenizer_url)
    if task is not None:
        model.config.kiln_task = task
    if seq_len is not None:
        model.config.kiln_seq_len = seq_len
    if getattr(model, "can_generate", lambda: False)():
        set_special_ids(model, tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    if storage.exists(storage.join(tokenizer_url, bpe.CONFIG_FILE)):
        bpe.copy_folder(tokenizer_url, out_dir)
    else:  # a run from before complete tokenizer folders: its tokenizer as Kiln read it, saved complete
        bpe.save(tokenizer, out_dir)
    return sorted(os.listdir(out_dir))


def check_embedding_fits(model: PreTrainedModel, tokens: int, tokenizer_url: str) -> None:
    """Every token id of the tokenizer must have an embedding row, or the export fails on the first padded batch."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < tokens:
        raise CheckpointError(
            f"the model embeds {rows} tokens but its tokenizer ({tokenizer_url}) has {tokens}: the run's model and "
            "tokenizer disagree; export a run whose data was prepared with this model's tokenizer"
        )


def set_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """A generative model's config and generation config name the tokenizer's bos/eos/pad, generation stops at EOS
    and at the chat template's end-of-turn tokens, and the generation cache is on (training turned it off).

    Only for models that generate: a classifier finds each text's last token by the pad id it trained with.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.config.use_cache = True
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = tokenizer.bos_token_id, eos, pad
    generation = model.generation_config
    generation.eos_token_id = generation_stops(tokenizer, generation.eos_token_id)
    generation.bos_token_id, generation.pad_token_id = tokenizer.bos_token_id, pad


def export_checkpoint(
    task_cfg,
    model_cfg,
    checkpoint_url: str,
    strategy: str,
    tokenizer_url: str,
    out_dir: str,
    seq_len: int | None = None,
) -> list[str]:
    """Build the run's model, load a checkpoint into it, and write a Hugging Face folder (LoRA merged in; a
    classifier's config.json names its classes: id2label, label2id)."""
    model = model_from_checkpoint(task_cfg, model_cfg, checkpoint_url, strategy, tokenizer_url)
    return save_hugging_face(model, tokenizer_url, out_dir, task=task_cfg.name, seq_len=seq_len)


def export_adapter(
    task_cfg, model_cfg, checkpoint_url: str, strategy: str, tokenizer_url: str, out_dir: str
) -> list[str]:
    """Write a LoRA run's adapters alone (adapter_config.json, adapter_model.safetensors), as peft saves them:
    `PeftModel.from_pretrained(base, out_dir)` on the run's init_from model restores the trained model."""
    model = model_from_checkpoint(task_cfg, model_cfg, checkpoint_url, strategy, tokenizer_url, merge=False)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)  # type: ignore[operator]
    return sorted(os.listdir(out_dir))


def model_from_checkpoint(
    task_cfg, model_cfg, checkpoint_url: str, strategy: str, tokenizer_url: str, merge: bool = True
) -> nn.Module:
    """The run's model (built by its task, task_cfg from the run's config, on CPU, in eval mode) holding a
    checkpoint's weights; LoRA adapters are merged into a plain model unless merge is False."""
    from trainers.tasks import build_model, build_task

    tokenizer = bpe.load(tokenizer_url)
    eos_id = bpe.require_eos(tokenizer, tokenizer_url)  # the data was prepared with it, so it has one
    model = build_model(build_task(task_cfg, eos_id), model_cfg, len(tokenizer), eos_id)
    load_consolidated(model, storage.join(checkpoint_url, "shards"), strategy)
    if merge and is_lora(model):
        model = merged(model)
    return model.eval()
