"""Under torchrun: train, save and reload a tiny decoder with DeepSpeed ZeRO, dumping the full training state.

    torchrun --standalone --nproc-per-node N tests/distributed/ds_reshard_probe.py OUT STRATEGIES ACTIONS MODEL...

MODEL...: the model's Kiln overrides (e.g. tests/helpers.py LLAMA_SHAPE: model=llama3_tiny model.n_layer=2 ...).
For each strategy (comma-separated, e.g. zero1,zero3_offload) it runs each action (comma-separated):
`save` trains SAVE_STEPS steps, saves to OUT/<strategy>/w<N>/shards and trains CONTINUE_STEPS more (the
uninterrupted reference); `load<W>` loads OUT/<strategy>/w<W>/shards, saved by W ranks, into a
differently initialised model on N ranks and trains the same CONTINUE_STEPS. Rank 0 writes the gathered
weights, Adam moments, steps and LR schedule (just after saving, or just after loading) and the
continuation's losses to OUT/<strategy>/w<N>/saved.pt, or OUT/<strategy>/w<W>/loaded_on_w<N>.pt.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.config import compose_config
from trainers.config import ModelConfig, OptimConfig, StrategyConfig
from trainers.distributed import ensure_process_group
from trainers.models import build_gpt2
from trainers.strategies import build_strategy

VOCAB, SEQ, GLOBAL_BATCH = 512, 32, 4
SAVE_STEPS, CONTINUE_STEPS, MAX_STEPS = 3, 2, 10
STAGES = {"zero1": (1, False), "zero2": (2, False), "zero3": (3, False), "zero3_offload": (3, True)}


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of a global batch that depends on the step only, not on the world size."""
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))
    per_rank = GLOBAL_BATCH // world
    return tokens[rank * per_rank : (rank + 1) * per_rank]


def build(name: str, model_cfg: ModelConfig, seed: int):
    """A fresh model wrapped by the named ZeRO strategy (micro-batch: this rank's share of the batch)."""
    stage, offload = STAGES[name]
    torch.manual_seed(seed)
    model = build_gpt2(model_cfg, VOCAB, 0)
    strategy = build_strategy(
        StrategyConfig(
            name=name, precision="fp32", zero_stage=stage, offload_optimizer=offload, offload_params=offload
        ),
        torch.device("cpu"),
    )
    optim = OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=1.0)
    strategy.wrap(model, optim, MAX_STEPS, micro_batch=GLOBAL_BATCH // dist.get_world_size(), grad_accum=1)
    return strategy


def train(strategy, first: int, count: int) -> list[float]:
    """Steps first..first+count-1; the global mean loss of each."""
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in range(first, first + count):
        ids = batch(step, rank, world)
        loss = strategy.model(input_ids=ids, labels=ids).loss
        strategy.backward(loss)
        strategy.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def adam_steps(strategy) -> list[float]:
    """The step count of each of the torch AdamW's param groups (one flat partition each)."""
    inner = strategy.optimizer.optimizer
    return [float(s["step"]) for s in inner.state.values() if "step" in s]


def module_state(strategy) -> dict:
    """The whole model's weights on CPU, ZeRO-3's gathered (a torchrun script: tests/ is not importable)."""
    import contextlib

    import deepspeed

    params = list(strategy.engine.module.parameters())
    stage3 = strategy.cfg.zero_stage == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if stage3 else contextlib.nullcontext():
        return {k: v.detach().cpu().clone() for k, v in strategy.engine.module.state_dict().items()}


def full_state(strategy) -> dict:
    """Collective: every parameter's fp32 value and Adam moments, unsharded, plus step and schedule."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = strategy.engine
    zero = engine.optimizer
    if hasattr(zero, "single_partition_of_fp32_groups"):
        # ZeRO-1/2 links each parameter to its Adam moments once, after the first group's first step,
        # when the other groups have no state yet: link them all now, or the gather finds no exp_avg.
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups, strict=False):
            lazy_init_hp_params_optimizer_state(params, flat, zero.optimizer.state)
    state: dict = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, param in engine.module.named_parameters():
        state["fp32"][name] = safe_get_full_fp32_param(param).detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[key][name] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
    state["module"] = module_state(strategy)
    inner = strategy.optimizer.optimizer
    state["adam_steps"] = adam_steps(strategy)
    state["weight_decay"] = [g["weight_decay"] for g in inner.param_groups]
    state["lr"] = strategy.current_lr()
    state["scheduler"] = {k: v for k, v in strategy.scheduler_state().items() if k != "lr_lambdas"}
    state["global_steps"] = engine.global_steps
    return state


def main(out: str, strategies: str, actions: str, *model: str) -> None:
    ensure_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_cfg = dataclasses.replace(compose_config([*model, f"data.seq_len={SEQ}"]).model, vocab_size=VOCAB)
    for name in strategies.split(","):
        for action in actions.split(","):
            if action == "save":
                folder = Path(out) / name / f"w{world}"
                strategy = build(name, model_cfg, seed=0)
                train(strategy, 0, SAVE_STEPS)
                strategy.save(str(folder / "shards"))
                result = folder / "saved.pt"
            else:
                saved_world = int(action.removeprefix("load"))
                folder = Path(out) / name / f"w{saved_world}"
                strategy = build(name, model_cfg, seed=1)  # other initial weights: the load must overwrite them all
                strategy.load(str(folder / "shards"), saved_world_size=saved_world)
                result = folder / f"loaded_on_w{world}.pt"
            state = full_state(strategy)
            state["losses"] = train(strategy, SAVE_STEPS, CONTINUE_STEPS)
            state["adam_steps_after"] = adam_steps(strategy)
            if rank == 0:
                torch.save(state, result)
            dist.barrier()
    # Before the interpreter exits: a rank that leaves gloo's threads running aborts ("terminate called
    # without an active exception"), and torchrun reports the whole probe failed.
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:])
