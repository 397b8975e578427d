"""LoRA on a tiny GPT-2: only the adapters train, and merging them gives the same model as a plain one."""

from __future__ import annotations

import pytest
import torch

from trainers.config import LoraConfig, ModelConfig
from trainers.lora import apply_lora, merged
from trainers.models import build_gpt2
from trainers.optim import param_groups
from trainers.strategies.dcp_io import frozen_names


def tiny_lora(**options):
    torch.manual_seed(0)
    base = build_gpt2(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32), vocab_size=300, eos_id=0)
    return apply_lora(base, LoraConfig(r=4, **options))


def test_only_the_adapters_of_the_default_modules_train():
    model = tiny_lora()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert adapted == {"c_attn", "c_proj", "c_fc"}  # GPT-2's attention and MLP maps
    assert "base_model.model.transformer.wte.weight" in frozen_names(model)  # left out of checkpoints
    # One optimizer group (all adapters are matrices): no empty group for ZeRO to drop.
    assert [len(g["params"]) for g in param_groups(model, 0.1)] == [len(trainable)]


def test_a_merged_model_computes_what_the_adapted_one_does():
    model = tiny_lora(target_modules=["c_attn"], alpha=8.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero: make the adapters change something
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        adapted = model.eval()(input_ids=ids).logits
        plain = merged(model).eval()
        assert type(plain).__name__ == "GPT2LMHeadModel" and not hasattr(plain, "peft_config")
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_a_classifiers_new_head_trains_in_full_beside_the_adapters():
    from trainers.models import build_from_config

    for arch, head in (("gpt2", "score"), ("bert", "classifier")):
        shape = ModelConfig(arch=arch, n_layer=1, n_head=2, n_embd=16, n_positions=32)
        base = build_from_config("AutoModelForSequenceClassification", shape, 100, 0, num_labels=3)
        model = apply_lora(base, LoraConfig(r=4))
        full = [name for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name]
        assert full and all(f".{head}.modules_to_save." in name for name in full), (arch, full)
        assert type(merged(model)).__name__.endswith("ForSequenceClassification")


def adapted_modules(model) -> set[str]:
    return {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in model.named_parameters() if ".lora_" in name}


def test_a_llama_takes_peft_defaults_or_every_linear_map_but_its_head():
    from trainers.models import build_from_config

    shape = ModelConfig(arch="llama", n_layer=1, n_head=2, n_kv_head=1, n_embd=16, n_positions=32)
    base = build_from_config("AutoModelForCausalLM", shape, 100, 0)
    assert adapted_modules(apply_lora(base, LoraConfig(r=4))) == {"q_proj", "v_proj"}  # peft's default
    everything = apply_lora(
        build_from_config("AutoModelForCausalLM", shape, 100, 0), LoraConfig(r=4, target="all-linear")
    )
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted_modules(everything) == projections  # not lm_head
    assert adapted_modules(tiny_lora(target="all-linear")) == {"c_attn", "c_proj", "c_fc"}  # GPT-2's Conv1D maps too


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.lora.target=all-linear"], "model.lora.target is ignored without LoRA; set model.lora.r"),
        (
            ["model.lora.r=8", "model.init_from=/m", "model.lora.target=all"],
            "model.lora.target must be one of all-linear",
        ),
        (
            [
                "model.lora.r=8",
                "model.init_from=/m",
                "model.lora.target=all-linear",
                "model.lora.target_modules=[c_fc]",
            ],
            "model.lora.target and model.lora.target_modules both name the modules to adapt; keep one",
        ),
    ],
)
def test_a_lora_target_out_of_place_is_one_line(overrides, expected):
    from orchestrator.config import UsageError, compose_config

    with pytest.raises(UsageError) as err:
        compose_config(overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)
