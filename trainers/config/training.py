"""How a run trains: the optim, strategy, train, checkpoint and tracker sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainers.config.checks import check_batch, one_of, require


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr``."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # The step where warmup + cosine reaches min_lr (and stays). Unset: the run's train.max_steps when it starts,
    # which the driver writes into the run's config.yaml, so `kiln resume RUN train.max_steps=N` keeps the schedule.
    schedule_steps: int | None = None

    def __post_init__(self) -> None:
        one_of("optim.name", self.name, ("adamw",))
        require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"optim.{name} must be in [0, 1), got {value}")
        require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        require(
            self.schedule_steps is None or self.schedule_steps > 0,
            f"optim.schedule_steps must be > 0 (or null: train.max_steps), got {self.schedule_steps}",
        )


STRATEGY_NAMES = ("ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload")
# The strategies LoRA (model.lora) trains with, each proven on CPU with 2 workers by tests/distributed/test_lora.py:
# only the adapters train, checkpoints hold only them, and a resume repeats the uninterrupted losses bit for bit.
# zero3_offload is not proven, so it is refused.
LORA_STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
# The strategies model.compile works with, proven on CPU with 2 workers by tests/distributed/test_compile.py (zero1
# runs zero2's DeepSpeedZeroOptimizer at stage 1). ZeRO-3 gathers every layer's parameters in hooks inside the block,
# which would split each compiled graph apart: refused rather than slower.
COMPILE_STRATEGIES = ("ddp", "fsdp", "zero1", "zero2")


@dataclass
class StrategyConfig:
    """How the model is replicated or sharded across workers; chosen by the `strategy` group."""

    name: str = "ddp"
    # fp32 | bf16 | fp16; "auto" means bf16 on a GPU that supports it, fp32 on CPU.
    precision: str = "auto"
    # FSDP2: free gathered parameters after forward (saves memory, costs a second all-gather).
    reshard_after_forward: bool = True
    # DeepSpeed (zero*): ZeRO stage and CPU offload; the strategy/ group's options set them.
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # Extra DeepSpeed config keys merged over the generated config, for experts.
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    # fp32 on a CUDA GPU: matmuls and convolutions on TF32 tensor cores (10-bit mantissa, ~8x faster on Ampere and
    # later), as torch.set_float32_matmul_precision("high"); false keeps every fp32 matmul in full fp32.
    tf32: bool = True

    def __post_init__(self) -> None:
        one_of("strategy.name", self.name, STRATEGY_NAMES)
        one_of("strategy.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        is_zero = self.name.startswith("zero")
        require(
            self.zero_stage in ((1, 2, 3) if is_zero else (0,)),
            f"strategy.zero_stage={self.zero_stage} does not fit strategy.name={self.name} "
            f"(pick the strategy with strategy=zero1|zero2|zero3|zero3_offload)",
        )
        require(
            is_zero or not (self.offload_optimizer or self.offload_params or self.deepspeed_overrides),
            f"strategy.offload_*/deepspeed_overrides apply to DeepSpeed strategies, not {self.name}",
        )
        require(
            not self.offload_params or self.zero_stage == 3,
            "strategy.offload_params needs ZeRO stage 3 (strategy=zero3_offload)",
        )
        require(
            self.tf32 or self.precision in ("auto", "fp32"),
            f"strategy.tf32=false is ignored with strategy.precision={self.precision} (its matmuls are not fp32); "
            "remove it or use strategy.precision=fp32",
        )

    @property
    def is_deepspeed(self) -> bool:
        """Whether DeepSpeed runs this strategy."""
        return self.name.startswith("zero")


@dataclass
class TrainConfig:
    """The loop: how long, how big a batch, how often to evaluate, log and checkpoint."""

    max_steps: int = 200
    global_batch: int = 16  # sequences per optimizer step, across all workers
    micro_batch: int = 8  # sequences per worker per forward/backward
    seed: int = 1234
    deterministic: bool = True
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 8  # micro-batches per worker per evaluation
    checkpoint_every: int = 100
    # Threads per worker for intra-op parallelism on CPU; 0 keeps torch's default.
    torch_threads: int = 1
    # A step (or checkpoint save) running longer than this is a hang: the worker fails with the rank
    # and last step named, so Ray restarts the group instead of waiting on a collective forever.
    # 0 turns the watchdog off.
    step_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "global_batch",
            "micro_batch",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            require(value > 0, f"train.{name} must be > 0, got {value}")
        require(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        require(self.torch_threads >= 0, f"train.torch_threads must be >= 0, got {self.torch_threads}")
        require(
            self.step_timeout_s >= 0, f"train.step_timeout_s must be >= 0 (0: no watchdog), got {self.step_timeout_s}"
        )

    def grad_accum(self, data_parallel: int, ranks: str = "cluster.num_workers") -> int:
        """Micro-batches each of `data_parallel` ranks accumulates per optimizer step (checked; ranks names them)."""
        return check_batch(self.global_batch, self.micro_batch, data_parallel, ranks)


@dataclass
class CheckpointConfig:
    """How checkpoints are written and kept (how often: train.checkpoint_every).

    `async_upload` is the key users type as `checkpoint.async` (Python reserves the word `async`;
    orchestrator/config/keys.py translates the spelling at the edge): uploads run in the background while
    training continues, at most one in flight, and the run never ends with one pending.
    """

    # Keep the newest N committed checkpoints (0: keep all) ...
    keep_last: int = 0
    # ... and also every checkpoint whose step is a multiple of this (0: none extra).
    keep_every: int = 0
    # After SIGTERM (preemption) or `kiln stop`, the checkpoint must be committed within this time.
    preempt_grace_s: float = 120.0
    async_upload: bool = False

    def __post_init__(self) -> None:
        require(self.keep_last >= 0, f"checkpoint.keep_last must be >= 0 (0: keep all), got {self.keep_last}")
        require(self.keep_every >= 0, f"checkpoint.keep_every must be >= 0, got {self.keep_every}")
        require(self.preempt_grace_s > 0, f"checkpoint.preempt_grace_s must be > 0, got {self.preempt_grace_s}")


@dataclass
class TrackerConfig:
    """Where metrics go besides metrics.jsonl (always written): `wandb` or `none`."""

    name: str = "wandb"
    project: str = "kiln"
    entity: str | None = None
    # None: $WANDB_MODE if set, else offline. Set "online" to sync (needs WANDB_API_KEY).
    mode: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None  # W&B's run group; a sweep's trials are grouped by sweep id

    def __post_init__(self) -> None:
        one_of("tracker.name", self.name, ("wandb", "none"))
        if self.mode is not None:
            one_of("tracker.mode", self.mode, ("offline", "online", "disabled"))
