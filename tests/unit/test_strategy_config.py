"""Choosing a strategy is one switch; what it generates follows Kiln's config; bad choices fail early."""

from __future__ import annotations

import re

import pytest
import torch

from orchestrator.config import UsageError, compose_config
from trainers.config import StrategyConfig
from trainers.flops import flops_per_token, mfu, peak_flops, tflops_per_device
from trainers.strategies.base import resolve_precision, use_tf32
from trainers.strategies.deepspeed_zero import deepspeed_config


@pytest.mark.parametrize(
    "name, stage, offload", [("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)]
)
def test_zero_groups_set_stage_and_offload(name, stage, offload):
    cfg = compose_config([f"strategy={name}"])
    assert (cfg.strategy.zero_stage, cfg.strategy.offload_optimizer, cfg.strategy.offload_params) == (
        stage,
        offload,
        offload,
    )


def test_deepspeed_config_is_generated_from_ours_and_overrides_merge():
    cfg = compose_config(
        [
            "strategy=zero3_offload",
            "train.global_batch=32",
            "train.micro_batch=4",
            "optim.grad_clip=0.5",
            "+strategy.deepspeed_overrides.zero_optimization.stage3_prefetch_bucket_size=1000",
        ]
    )
    ds = deepspeed_config(
        stage=3,
        micro_batch=cfg.train.micro_batch,
        grad_accum=cfg.grad_accum,
        world_size=cfg.cluster.num_workers,
        grad_clip=cfg.optim.grad_clip,
        precision="bf16",
        offload_optimizer=True,
        offload_params=True,
        overrides=dict(cfg.strategy.deepspeed_overrides),
    )
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy=fsdpp"], "strategy=fsdpp: no such option (did you mean strategy=fsdp?)"),
        (["strategy=ddp", "strategy.zero_stage=2"], "strategy.zero_stage=2 does not fit strategy.name=ddp"),
        (["strategy=zero2", "strategy.offload_params=true"], "strategy.offload_params needs ZeRO stage 3"),
        (["strategy.precision=fp16"], "strategy.precision=fp16 needs GPUs"),
        (["strategy.precision=fp8"], "strategy.precision must be one of"),
    ],
)
def test_bad_strategy_choices_fail_before_ray(overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        compose_config(overrides)


def test_precision_is_validated_against_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision(StrategyConfig(precision="auto"), cpu) == "fp32"
    assert resolve_precision(StrategyConfig(precision="bf16"), cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision(StrategyConfig(precision="fp16"), cpu)


def test_flops_per_token_and_mfu():
    # GPT-2 124M: 85M non-embedding-matmul params + 38.6M tied wte (multiplied by the LM head).
    n = 124_439_808 - 1024 * 768  # without position embeddings
    per_token = flops_per_token(n, n_layer=12, n_embd=768, seq_len=1024)
    assert per_token == pytest.approx(6 * n + 12 * 12 * 768 * 1024)
    assert per_token == pytest.approx(8.55e8, rel=0.01)
    assert mfu(400_000, per_token, 989e12, 1) == pytest.approx(0.346, rel=0.01)
    # 8 GPUs at 3.2M tokens/s together: each does 342 TFLOP/s of model math, the same 0.346 of an H100.
    assert tflops_per_device(3_200_000, per_token, 8) == pytest.approx(342, rel=0.01)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None


def test_adamw_runs_fused_on_a_gpu_and_as_before_on_cpu():
    from trainers.config import OptimConfig
    from trainers.optim import adamw_kernels, build_optimizer
    from trainers.strategies.deepspeed_zero import optimizer_step_device

    assert adamw_kernels("cuda") == {"fused": True}
    assert adamw_kernels("cpu") == {"foreach": False}  # torch's CPU default, named so CPU numbers never move
    optimizer = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(), "cpu")
    assert optimizer.defaults["foreach"] is False and not optimizer.defaults["fused"]
    # ZeRO with optimizer offload steps on its CPU copy: CPU kernels even on a GPU machine.
    assert optimizer_step_device(True, torch.device("cuda", 0)) == "cpu"
    assert optimizer_step_device(False, torch.device("cuda", 0)) == "cuda"


def test_a_torchrun_group_serves_nccl_to_gpu_tensors_and_gloo_to_the_config_broadcast():
    from trainers.distributed import torchrun_backend

    # torchrun's group is made before the config exists: one group must serve a GPU run's gradients (NCCL) and
    # the config's object broadcast (CPU, gloo); torch picks the backend by each tensor's device.
    assert torchrun_backend(cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert torchrun_backend(cuda_available=False) == "gloo"


@pytest.mark.parametrize(
    "tf32, precision, device, expected",
    [
        (True, "fp32", "cuda", True),
        (False, "fp32", "cuda", False),  # the user wants full fp32 matmuls
        (True, "bf16", "cuda", False),  # its matmuls are bf16 already
        (True, "fp32", "cpu", False),  # no tensor cores
    ],
)
def test_tf32_serves_fp32_matmuls_on_a_gpu_only(tf32, precision, device, expected):
    assert use_tf32(StrategyConfig(tf32=tf32), precision, device) is expected


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["strategy.precision=bf16", "strategy.tf32=false"],
            "strategy.tf32=false is ignored with strategy.precision=bf16",
        ),
        (["strategy=zero3", "model.compile=true"], "model.compile with strategy=zero3: ZeRO-3 gathers"),
        (["strategy=zero3_offload", "model.compile=true"], "use one of ddp, fsdp, zero1, zero2"),
    ],
)
def test_settings_the_gpu_options_would_ignore_or_cannot_serve_fail_in_one_line(overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        compose_config(overrides)


def test_compile_and_tf32_compose_with_the_strategies_that_serve_them():
    for strategy in ("ddp", "fsdp", "zero1", "zero2"):
        assert compose_config([f"strategy={strategy}", "model.compile=true"]).model.compile
    assert compose_config(["strategy.precision=fp32", "strategy.tf32=false"]).strategy.tf32 is False


def test_lora_is_not_compiled():
    from trainers.config import ConfigError, LoraConfig, ModelConfig

    with pytest.raises(ConfigError, match=re.escape("model.compile with model.lora: compiled peft adapters")):
        ModelConfig(init_from="/models/base", lora=LoraConfig(r=8), compile=True)
