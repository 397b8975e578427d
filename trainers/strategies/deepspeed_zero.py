"""DeepSpeed ZeRO stage 1, 2 and 3, optionally offloading optimizer state and parameters to CPU.

The DeepSpeed config is generated from Kiln's own config (batch sizes, accumulation, clipping,
precision, ZeRO stage), so a user keeps one source of truth; `strategy.deepspeed_overrides` is merged
on top for experts. The optimizer and LR schedule are the same torch AdamW + warmup/cosine objects the
other strategies use, handed to `deepspeed.initialize`, so every strategy follows the same math.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from data_pipeline import storage
from trainers.checkpoint import safe_load
from trainers.checkpoint.resharding import repair_zero3_universal_load, universal_checkpoint
from trainers.checkpoint.shards import CHECKPOINT_TAG, FileRecords
from trainers.config import OptimConfig
from trainers.optim import build_optimizer, build_scheduler
from trainers.strategies.base import ScheduledStrategy, setup_precision, tensor_bytes


def deep_merge(base: dict, extra: dict) -> dict:
    """base with extra merged in, recursively (extra wins)."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(
    *,
    stage: int,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    precision: str,
    offload_optimizer: bool,
    offload_params: bool,
    overrides: dict[str, object],
) -> dict[str, object]:
    """The DeepSpeed JSON config that corresponds to Kiln's settings."""
    zero: dict[str, object] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our torch AdamW, also when offloading (DeepSpeedCPUAdam would need a compiled op).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, overrides)


def optimizer_step_device(offload_optimizer: bool, device: torch.device) -> str:
    """Where ZeRO steps our AdamW: on its CPU copy of the partition with optimizer offload, else on the device.

    ZeRO hands the torch optimizer its own flat fp32 partition tensors (param_groups swapped in) and calls step(),
    so on a GPU the fused kernel serves them like any CUDA tensors.
    """
    return "cpu" if offload_optimizer else device.type


def hash_folder(folder: str) -> FileRecords:
    """(size, sha256) of every file under a local folder, keyed by relative path."""
    records = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            # A plain open, not storage.sha256_file: a local scratch file has no store errors to retry.
            with open(path, "rb") as handle:
                digest = storage.sha256_stream(handle)
            records[os.path.relpath(path, folder).replace(os.sep, "/")] = (os.path.getsize(path), digest)
    return records


class DeepSpeedStrategy(ScheduledStrategy):
    """A DeepSpeed engine around the model, with our optimizer and schedule."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.name = cfg.name
        self.precision = setup_precision(cfg, device)

    def wrap(
        self, model: nn.Module, optim_cfg: OptimConfig, max_steps: int, micro_batch: int = 1, grad_accum: int = 1
    ) -> nn.Module:
        import deepspeed
        import torch.distributed as dist

        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        model.to(self.device)
        optimizer = build_optimizer(model, optim_cfg, optimizer_step_device(self.cfg.offload_optimizer, self.device))
        scheduler = build_scheduler(optimizer, optim_cfg, max_steps)
        self.ds_config = deepspeed_config(
            stage=self.cfg.zero_stage,
            micro_batch=micro_batch,
            grad_accum=grad_accum,
            world_size=dist.get_world_size(),
            grad_clip=optim_cfg.grad_clip,
            precision=self.precision,
            offload_optimizer=self.cfg.offload_optimizer,
            offload_params=self.cfg.offload_params,
            overrides=dict(self.cfg.deepspeed_overrides),
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        self.model = self.engine
        # Frozen parameters (a LoRA base) are left out of checkpoints: they come from the run's model.init_from.
        self.has_frozen = any(not p.requires_grad for p in model.parameters())
        return self.engine

    def autocast(self) -> AbstractContextManager:
        return contextlib.nullcontext()  # the engine casts per its bf16/fp16 config

    def no_sync(self) -> AbstractContextManager:
        return contextlib.nullcontext()  # the engine knows the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divided the loss by grad_accum; DeepSpeed must not divide it again.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # counts the micro-step; the optimizer steps only at the boundary

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, shards_url: str) -> FileRecords:
        return self.save_async(shards_url, None)()

    def save_async(self, shards_url: str, group) -> Callable[[], FileRecords]:
        # DeepSpeed writes local files only. On a local run they go straight into place; for object
        # storage each rank saves into its own scratch folder (a snapshot, so training may go on) and
        # finish() uploads what this rank wrote, file by file with retries.
        if storage.is_local(shards_url):
            os.makedirs(shards_url, exist_ok=True)
            self.engine.save_checkpoint(
                shards_url, tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=self.has_frozen
            )
            return dict  # the commit hashes local files itself, cheaply
        scratch = tempfile.mkdtemp(prefix="kiln-ds-save-")
        try:
            self.engine.save_checkpoint(
                scratch, tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=self.has_frozen
            )
            records = hash_folder(scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

        def finish() -> FileRecords:
            try:
                storage.put_folder(scratch, shards_url)
                return records
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

        return finish

    def load(self, shards_url: str, saved_world_size: int | None = None) -> None:
        """Collective: read what save() wrote, in place, also when it was saved on another world size."""
        import torch.distributed as dist

        if saved_world_size is None or saved_world_size == dist.get_world_size():
            with storage.local_folder(shards_url) as folder, safe_load.deepspeed_reads(shards_url):
                path, _ = self.engine.load_checkpoint(
                    folder,
                    tag=CHECKPOINT_TAG,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                    load_module_strict=not self.has_frozen,
                )
        else:
            path = self._load_resharded(shards_url)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {shards_url}")

    def _load_resharded(self, shards_url: str) -> str | None:
        """Load a checkpoint of another data-parallel size through DeepSpeed's universal checkpoint format."""
        with universal_checkpoint(shards_url, CHECKPOINT_TAG) as folder:
            # `checkpoint.load_universal` is read only inside load_checkpoint (which files to open, and
            # whether the ZeRO optimizer re-slices full per-parameter tensors instead of taking its own
            # partition file), never at initialize time, so switching it on for this one call is enough
            # and leaves the engine exactly as configured for every later save and same-size load.
            # The LambdaLR's state and the engine's step counters come from the copied model-states file.
            config = self.engine._config
            previous, config.load_universal_checkpoint = config.load_universal_checkpoint, True
            try:
                with safe_load.deepspeed_reads(shards_url):
                    path, _ = self.engine.load_checkpoint(
                        folder,
                        tag=CHECKPOINT_TAG,
                        load_optimizer_states=True,
                        load_lr_scheduler_states=True,
                        load_module_strict=not self.has_frozen,
                    )
            finally:
                config.load_universal_checkpoint = previous
            if path is not None and self.cfg.zero_stage == 3:
                repair_zero3_universal_load(self.optimizer, os.path.join(folder, CHECKPOINT_TAG))
        return path

    def held_bytes(self) -> dict[str, int]:
        params = 0
        for p in self.engine.module.parameters():
            local = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps only this rank's partition
            params += local.numel() * local.element_size()
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        optim = sum(
            tensor_bytes(v for v in state.values() if isinstance(v, torch.Tensor)) for state in inner.state.values()
        )
        # ZeRO steps an fp32 copy of this rank's partition (kept even when the model itself is fp32).
        masters = (
            getattr(self.optimizer, "single_partition_of_fp32_groups", None)
            or getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
            or []
        )
        master = sum(m.numel() * m.element_size() for m in masters)
        return {"params": params, "optim": optim, "master": master}
