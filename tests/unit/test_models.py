"""Models built from config: `model.arch` picks GPT-2 or BERT, a task trains only the archs it can, and FSDP2
finds either architecture's blocks."""

from __future__ import annotations

import pytest
import torch

from orchestrator.config import UsageError, compose_config
from trainers.config import ModelConfig
from trainers.models import (
    bert_config,
    build_from_config,
    build_gpt2,
    build_masked_lm,
    compile_blocks,
    transformer_blocks,
)
from trainers.task_data import arch_error, task_for_architectures

BERT = ModelConfig(arch="bert", n_layer=2, n_head=2, n_embd=32, n_positions=64)
GPT2 = ModelConfig(arch="gpt2", n_layer=3, n_head=2, n_embd=32, n_positions=64)


def test_bert_config_reads_our_fields_and_pads_with_eos():
    config = bert_config(BERT, vocab_size=300, eos_id=7)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.intermediate_size, config.max_position_embeddings, config.vocab_size) == (128, 64, 320)
    assert config.pad_token_id == 7  # not 0, a real token whose embedding row BERT would freeze
    assert bert_config(BERT, 300, 7, num_labels=3).num_labels == 3


def test_a_masked_lm_from_config_is_bert_with_the_configured_attention():
    model = build_masked_lm(BERT, vocab_size=300, eos_id=0)
    assert type(model).__name__ == "BertForMaskedLM"
    assert model.config._attn_implementation == "sdpa"
    assert model.bert.embeddings.word_embeddings.padding_idx == 0
    logits = model(input_ids=torch.randint(1, 300, (2, 16))).logits
    assert logits.shape == (2, 16, 320)


def test_gpt2_is_built_as_before_and_any_head_by_its_auto_class():
    torch.manual_seed(0)
    model = build_gpt2(GPT2, 300, 0)
    assert type(model).__name__ == "GPT2LMHeadModel"
    heads = build_from_config("AutoModelForSequenceClassification", BERT, 300, 0, num_labels=3)
    assert type(heads).__name__ == "BertForSequenceClassification" and heads.config.num_labels == 3


@pytest.mark.parametrize(
    "model, blocks, kind",
    [
        (lambda: build_gpt2(GPT2, 300, 0), 3, "GPT2Block"),
        (lambda: build_masked_lm(BERT, 300, 0), 2, "BertLayer"),
        (lambda: build_from_config("AutoModelForSequenceClassification", BERT, 300, 0, num_labels=2), 2, "BertLayer"),
    ],
)
def test_fsdp2_finds_the_blocks_of_either_architecture(model, blocks, kind):
    found = transformer_blocks(model())
    assert len(found) == blocks and {type(b).__name__ for b in found} == {kind}


def test_fsdp2_names_a_model_whose_blocks_it_cannot_tell():
    with pytest.raises(ValueError, match="FSDP2 cannot tell the blocks of Linear"):
        transformer_blocks(torch.nn.Linear(2, 2))


def test_each_task_trains_only_its_archs():
    assert arch_error("causal_lm", "gpt2") is None and arch_error("mlm", "bert") is None
    assert arch_error("mlm", "gpt2") == (
        "task.name=mlm does not train model.arch=gpt2 models; it trains model.arch=bert: "
        "choose model=bert_tiny or model=bert_small (or model.init_from a folder of that kind)"
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=bert_tiny"], "task.name=causal_lm does not train model.arch=bert models"),
        (["task=sft", "model=bert_small"], "task.name=sft does not train model.arch=bert models"),
        (["model.arch=bert"], "choose model=gpt2_tiny or model=gpt2_small"),
    ],
)
def test_a_task_on_a_model_it_cannot_train_is_one_line(overrides, expected):
    with pytest.raises(UsageError) as err:
        compose_config(overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_the_task_of_a_folder_comes_from_its_architectures():
    assert task_for_architectures(["BertForMaskedLM"]) == "mlm"
    assert task_for_architectures(["GPT2LMHeadModel"]) == "causal_lm"
    assert task_for_architectures(["LlamaForCausalLM"]) == "causal_lm"
    assert task_for_architectures(["SomethingElse"]) is None and task_for_architectures([]) is None


def test_compiling_marks_every_block_and_keeps_the_parameter_names():
    model = build_gpt2(GPT2, vocab_size=300, eos_id=0)
    names = list(model.state_dict())
    compile_blocks(model)  # compiles lazily, on the first call: nothing is compiled here
    assert all(block._compiled_call_impl is not None for block in transformer_blocks(model))
    assert model._compiled_call_impl is None  # the blocks, not the whole model
    assert list(model.state_dict()) == names  # checkpoints and exports read the uncompiled names
