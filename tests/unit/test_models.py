"""Models built from config: `model.arch` picks GPT-2, BERT or a Llama-family decoder (two of them MoE), a task trains
only the archs it can, every conf/model preset builds (the published shapes to their published parameter counts), and
FSDP2 finds every architecture's blocks."""

from __future__ import annotations

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from orchestrator.config import CONF_DIR, UsageError, compose_config
from trainers.config import DECODER_ARCHS, MOE_ARCHS, ModelConfig
from trainers.models import (
    arch_config,
    bert_config,
    build_from_config,
    build_gpt2,
    build_masked_lm,
    compile_blocks,
    swiglu_width,
    transformer_blocks,
)
from trainers.task_data import TASK_ARCHS, arch_error, task_for_architectures

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


def decoder(arch: str, **keys) -> ModelConfig:
    """A two-layer decoder of arch with grouped-query attention (4 query heads, 2 key/value heads of width 8)."""
    moe = {"n_experts": 2, "experts_per_token": 1} if arch in MOE_ARCHS else {}  # as many experts as layers
    return ModelConfig(arch=arch, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_positions=64, **{**moe, **keys})


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_each_decoder_arch_is_its_transformers_model_with_our_shape_and_trains(arch):
    torch.manual_seed(0)
    model = build_from_config("AutoModelForCausalLM", decoder(arch), vocab_size=300, eos_id=7)
    config = model.config
    assert config.model_type == arch and type(model).__name__.endswith("ForCausalLM")
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (32, 2, 4, 2) and (config.head_dim, config.max_position_embeddings) == (8, 64)
    assert config.intermediate_size == 256  # swiglu_width(32): 2/3 of 4 x 32, up to a multiple of 256
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (320, 7, 7, None)
    assert not config.use_cache and not config.tie_word_embeddings
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 8  # two key/value heads, not four
    ids = torch.randint(0, 300, (2, 16))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.model.layers[0].self_attn.q_proj.weight.grad is not None
    # FSDP2's units are the decoder layers, even with as many experts as layers (MoE archs here).
    assert transformer_blocks(model) == list(model.model.layers)
    moe = getattr(out, "aux_loss", None) is not None
    assert moe == (arch in MOE_ARCHS) == bool(getattr(config, "output_router_logits", False))


def test_every_decoder_key_reaches_its_transformers_field():
    keys = {"head_dim": 16, "intermediate_size": 48, "rope_theta": 5e5, "norm_eps": 1e-5, "tie_embeddings": True}
    moe = {"n_experts": 4, "experts_per_token": 1, "router_aux_loss_coef": 0.01}
    qwen = arch_config(decoder("qwen3_moe", **keys, **moe), vocab_size=300, eos_id=0)
    assert (qwen.head_dim, qwen.rope_parameters["rope_theta"], qwen.rms_norm_eps, qwen.tie_word_embeddings) == (
        16,
        5e5,
        1e-5,
        True,
    )
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.router_aux_loss_coef) == (4, 1, 0.01)
    assert (qwen.moe_intermediate_size, qwen.mlp_only_layers, qwen.decoder_sparse_step) == (48, [], 1)
    assert qwen.norm_topk_prob  # as the published Qwen3 MoE models
    mixtral = arch_config(decoder("mixtral", **moe), vocab_size=300, eos_id=0)
    assert (mixtral.num_local_experts, mixtral.intermediate_size, mixtral.rope_parameters["rope_theta"]) == (
        4,
        256,
        1e6,
    )
    assert arch_config(decoder("mistral"), 300, 0).sliding_window is None  # full attention
    assert arch_config(decoder("llama"), 300, 0).rope_parameters["rope_theta"] == 1e4  # transformers' default
    assert arch_config(decoder("llama", dropout=0.1), 300, 0).attention_dropout == 0.1


def test_the_default_mlp_width_is_llamas_swiglu_rule():
    assert swiglu_width(4096) == 11008 and swiglu_width(5120) == 13824  # LLaMA 7B and 13B
    assert swiglu_width(32) == 256


# The released models' parameter counts (their tied heads counted once): Llama 3.2 1B, Llama 3 8B, and Qwen3 0.6B
# (its model card: 0.6B, of which 0.44B are not embeddings).
PUBLISHED = {"llama3_1b": 1_235_814_400, "llama3_8b": 8_030_261_248, "qwen3_0_6b": 596_049_920}


@pytest.mark.parametrize("preset", sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml")))
def test_every_model_preset_composes_and_builds(preset):
    arch = OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml").arch
    task = next(task for task in ("causal_lm", "mlm") if arch in TASK_ARCHS[task])
    cfg = compose_config([f"model={preset}", f"task={task}"]).model
    auto = "AutoModelForCausalLM" if task == "causal_lm" else "AutoModelForMaskedLM"
    if preset.endswith("_tiny"):
        torch.manual_seed(0)
        model = build_from_config(auto, cfg, vocab_size=512, eos_id=0)
        ids = torch.randint(0, 512, (2, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(transformer_blocks(model)) == cfg.n_layer
        return
    with torch.device("meta"):  # the shape alone: no memory, no initialisation
        model = getattr(transformers, auto).from_config(arch_config(cfg, vocab_size=512, eos_id=0))
    params = sum(p.numel() for p in model.parameters())
    assert params == PUBLISHED.get(preset, params)


def test_the_published_shapes_have_the_published_parameter_counts():
    assert set(PUBLISHED) <= {path.stem for path in (CONF_DIR / "model").glob("*.yaml")}
    cfg = compose_config(["model=qwen3_0_6b"]).model
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(arch_config(cfg, vocab_size=512, eos_id=0))
    embedding = model.get_input_embeddings().weight.numel()
    assert sum(p.numel() for p in model.parameters()) - embedding == 440_467_456  # "0.44B non-embedding"
    assert model.config.head_dim * model.config.num_attention_heads == 2048  # wider than hidden (1024)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["model.n_kv_head=2"],
            "model.n_kv_head is read only by model.arch=llama|qwen2|qwen3|mistral|qwen3_moe|mixtral, not gpt2; "
            "remove it",
        ),
        (["model=bert_tiny", "task=mlm", "model.rope_theta=1e4"], "model.rope_theta is read only by"),
        (
            ["model=llama3_tiny", "model.n_experts=4"],
            "model.n_experts is read only by model.arch=qwen3_moe|mixtral, not llama; remove it",
        ),
        (["model=llama3_tiny", "model.n_kv_head=3"], "model.n_head (4) must be divisible by model.n_kv_head (3)"),
        (["model=llama3_tiny", "model.n_kv_head=0"], "model.n_kv_head must be > 0 (or null for the default), got 0"),
        (["model=llama3_tiny", "model.head_dim=7"], "model.head_dim must be even for RoPE, got 7"),
        (["model=llama3_tiny", "model.n_embd=12"], "model.n_embd / model.n_head (3, each head's width) must be even"),
        (["model=llama3_tiny", "model.intermediate_size=0"], "model.intermediate_size must be > 0"),
        (
            ["model=qwen3_moe_tiny", "model.experts_per_token=5"],
            "model.experts_per_token (5) must be between 1 and model.n_experts (4)",
        ),
        (["model=qwen3_moe_tiny", "model.router_aux_loss_coef=-1"], "model.router_aux_loss_coef must be >= 0"),
        (["model.arch=mixtral", "model.experts_per_token=9"], "model.experts_per_token (9) must be between 1 and"),
        (["task=mlm", "model=llama3_tiny"], "task.name=mlm does not train model.arch=llama models"),
        (["model.init_from=/m", "model.n_kv_head=2"], "model.n_kv_head=2 is ignored with model.init_from=/m"),
    ],
)
def test_a_decoder_key_out_of_place_is_one_line_naming_it(overrides, expected):
    with pytest.raises(UsageError) as err:
        compose_config(overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)
