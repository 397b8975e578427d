"""The typed config a training worker runs on: its sections and `WorkerConfig`, the whole of them.

Each section validates itself in ``__post_init__`` (OmegaConf calls it when the composed config is
turned into objects), so a bad value fails on the driver before any worker starts. Errors name the
field as a user types it on the command line. The orchestrator's root schema (`KilnConfig`) is a
`WorkerConfig` plus where the workers run (`cluster`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.config import DataConfig, StorageConfig
from trainers.run import folder as run_folder
from trainers.task_data import ARCH_MODELS, TASK_NEEDS, arch_error

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always fullmatch: `$` admits a trailing newline


class ConfigError(ValueError):
    """A config value a user must fix; the message names the field and says what is allowed."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Fail unless value is one of allowed, naming the field and the choices."""
    require(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_batch(global_batch: int, micro_batch: int, data_parallel: int) -> int:
    """Micro-batches each worker accumulates per optimizer step, or fail naming the mismatch.

    global_batch = micro_batch x gradient accumulation x data-parallel workers; the one place it is checked.
    """
    per_pass = micro_batch * data_parallel
    if global_batch % per_pass:
        lower = max(per_pass, global_batch - global_batch % per_pass)
        raise ConfigError(
            f"train.global_batch={global_batch} is not divisible by train.micro_batch ({micro_batch}) x "
            f"cluster.num_workers ({data_parallel}) = {per_pass}; use a multiple of {per_pass} "
            f"(e.g. {lower} or {lower + per_pass})"
        )
    return global_batch // per_pass


@dataclass
class RunSection:
    """Identity of a run: `run.id` names it (a readable unique id is made when unset)."""

    id: str | None = None
    name: str = "run"  # experiments set it; the prefix of generated ids

    def __post_init__(self) -> None:
        require(
            self.id is None or bool(RUN_ID_PATTERN.fullmatch(self.id)),
            f"run.id must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit); got {self.id!r}",
        )
        require(
            bool(RUN_ID_PATTERN.fullmatch(self.name)),
            f"run.name must be 1-64 letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit); got {self.name!r}",
        )


# The model.arch values of the RoPE/RMSNorm/SwiGLU decoders (Llama's family) and of those with mixture-of-experts
# MLPs, and the model.* keys each reads (GPT-2 and BERT read none of them: a value set there is an error).
DECODER_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral")
MOE_ARCHS = ("qwen3_moe", "mixtral")
DECODER_KEYS = ("n_kv_head", "head_dim", "intermediate_size", "rope_theta", "norm_eps", "tie_embeddings")
MOE_KEYS = ("n_experts", "experts_per_token", "router_aux_loss_coef")


# The model.* settings a `model.init_from` folder decides (its config.json): setting one with it is an error.
FOLDER_DECIDED = (
    "arch",
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "dropout",
    "vocab_size",
    *DECODER_KEYS,
    *MOE_KEYS,
)
INIT_FROM_RUN = "run:"  # model.init_from=run:RUN[@STEP]: a Kiln run's committed checkpoint
INIT_FROM_RUN_PATTERN = re.compile(r"run:(?P<run>[^@]*)(?:@(?P<step>.*))?", re.DOTALL)


def parse_init_run(value: str) -> tuple[str, int | None] | None:
    """(run id, step or None) of `run:RUN[@STEP]`, None for a folder path; ConfigError when misspelled."""
    if not value.startswith(INIT_FROM_RUN):
        return None
    match = INIT_FROM_RUN_PATTERN.fullmatch(value)
    assert match is not None  # the pattern takes anything after run:
    run, step = match.group("run"), match.group("step")
    require(
        bool(RUN_ID_PATTERN.fullmatch(run)) and (step is None or step.isdigit()),
        f"model.init_from={value!r}: write run:RUN or run:RUN@STEP (a run id and a checkpoint step number)",
    )
    return run, None if step is None else int(step)


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on a model.init_from base: only the adapters train; `r` unset or 0 turns LoRA off.

    LoRA adapts a trained model, so it needs model.init_from; the frozen base is read back from the run's
    copy of it (`<run>/init_model`), and checkpoints hold only the adapters and their optimizer state.
    """

    r: int | None = None  # the adapters' rank; None or 0: no LoRA
    alpha: float | None = None  # scaling numerator (the update is scaled by alpha / r); None: 2 * r
    target_modules: list[str] | None = None  # modules to adapt; None: the architecture's default (trainers/lora.py)
    # `all-linear`: every linear map of the model but its output head (peft's own spelling); instead of target_modules
    target: str | None = None
    dropout: float | None = None  # dropout on the adapters' input; None: 0

    @property
    def enabled(self) -> bool:
        """Whether LoRA adapters are trained."""
        return bool(self.r)

    def __post_init__(self) -> None:
        require(self.r is None or self.r >= 0, f"model.lora.r must be >= 1 (or 0/null: no LoRA), got {self.r}")
        if not self.enabled:
            for name in ("alpha", "target_modules", "target", "dropout"):
                require(
                    getattr(self, name) is None,
                    f"model.lora.{name} is ignored without LoRA; set model.lora.r (e.g. model.lora.r=8) or remove it",
                )
            return
        require(self.alpha is None or self.alpha > 0, f"model.lora.alpha must be > 0, got {self.alpha}")
        require(
            self.dropout is None or 0.0 <= self.dropout < 1.0,
            f"model.lora.dropout must be in [0, 1), got {self.dropout}",
        )
        require(
            self.target_modules is None or (len(self.target_modules) > 0 and all(self.target_modules)),
            f"model.lora.target_modules must name at least one module (or be null for the default), "
            f"got {self.target_modules}",
        )
        if self.target is not None:
            one_of("model.lora.target", self.target, ("all-linear",))
            require(
                self.target_modules is None,
                "model.lora.target and model.lora.target_modules both name the modules to adapt; keep one",
            )


@dataclass
class ModelConfig:
    """A decoder (GPT-2, Llama's family, two MoE families) or BERT encoder built from config (never downloaded), or
    one loaded from `init_from`.

    `init_from` is a local Hugging Face model folder (architecture, weights and tokenizer come from it) or
    `run:RUN[@STEP]`, a Kiln run's committed checkpoint (newest, or STEP) under the same storage.root.
    The driver turns `run:` into a folder inside the new run before workers start (orchestrator/run/init_source.py).
    """

    arch: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    dropout: float = 0.0
    # None: the tokenizer's vocabulary size, rounded up to a multiple of 64 for efficient matmuls.
    vocab_size: int | None = None
    attn_implementation: str = "sdpa"
    activation_checkpointing: bool = False
    # torch.compile each transformer block (trainers/models.py compile_blocks); the first steps pay the compile time.
    compile: bool = False
    init_from: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Read by DECODER_ARCHS only (None: the value in the comment; trainers/models.py decoder_config builds them).
    n_kv_head: int | None = None  # key/value heads, shared by n_head / n_kv_head query heads each (GQA); None: n_head
    head_dim: int | None = None  # each head's width; None: n_embd / n_head (Qwen3-0.6B's 128 is neither)
    # The MLP's hidden width (in an MoE arch each expert's); None: LLaMA's SwiGLU width, 2/3 of 4 x n_embd rounded
    # up to a multiple of 256 (11008 for n_embd=4096, as Llama 2 7B).
    intermediate_size: int | None = None
    rope_theta: float | None = None  # RoPE base; None: transformers' default (1e6 for mixtral, else 1e4)
    norm_eps: float | None = None  # RMSNorm epsilon; None: transformers' default (1e-5 for mixtral, else 1e-6)
    tie_embeddings: bool | None = None  # the LM head shares the input embedding; None: untied
    # Read by MOE_ARCHS only.
    n_experts: int | None = None  # experts per MoE layer; None: 8
    experts_per_token: int | None = None  # experts each token is routed to; None: 2
    # weight of the router's load-balancing loss added to the LM loss; None: transformers' default, 0.001
    router_aux_loss_coef: float | None = None

    @property
    def experts(self) -> tuple[int, int]:
        """(experts per MoE layer, experts per token), defaults filled in."""
        experts, per_token = self.n_experts, self.experts_per_token
        return 8 if experts is None else experts, 2 if per_token is None else per_token

    def __post_init__(self) -> None:
        one_of("model.arch", self.arch, tuple(ARCH_MODELS))
        require(
            not self.lora.enabled or self.init_from is not None,
            f"model.lora.r={self.lora.r} needs model.init_from: LoRA adapts a trained model (pretrain, `kiln export`, "
            "then model.init_from=DIR or run:RUN)",
        )
        require(
            not (self.compile and self.lora.enabled),
            "model.compile with model.lora: compiled peft adapters are not proven in Kiln; "
            "train LoRA with model.compile=false",
        )
        if self.init_from is not None:
            self.check_init_from()
        for name in ("n_layer", "n_head", "n_embd", "n_positions"):
            require(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})",
        )
        require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        require(
            self.vocab_size is None or self.vocab_size > 0,
            f"model.vocab_size must be > 0 or null, got {self.vocab_size}",
        )
        one_of("model.attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        self.check_arch_keys()
        if self.arch in DECODER_ARCHS:
            self.check_decoder()

    def check_arch_keys(self) -> None:
        """No decoder or MoE key set on an arch that ignores it."""
        for keys, archs in ((DECODER_KEYS, DECODER_ARCHS), (MOE_KEYS, MOE_ARCHS)):
            for name in keys:
                require(
                    getattr(self, name) is None or self.arch in archs,
                    f"model.{name} is read only by model.arch={'|'.join(archs)}, not {self.arch}; remove it",
                )

    def check_decoder(self) -> None:
        """The shape of a Llama-family decoder: whole key/value groups, even RoPE heads, a sane router."""
        for name in ("n_kv_head", "head_dim", "intermediate_size", "rope_theta", "norm_eps", "n_experts"):
            value = getattr(self, name)
            require(value is None or value > 0, f"model.{name} must be > 0 (or null for the default), got {value}")
        kv_heads = self.n_kv_head or self.n_head
        require(
            self.n_head % kv_heads == 0,
            f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({kv_heads}): "
            "each key/value head serves a whole group of query heads",
        )
        # RoPE rotates pairs of a head's dimensions.
        if self.head_dim is not None:
            require(self.head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {self.head_dim}")
        else:
            width = self.n_embd // self.n_head
            require(
                width % 2 == 0,
                f"model.n_embd / model.n_head ({width}, each head's width) must be even for RoPE; "
                "change them or set model.head_dim",
            )
        if self.arch not in MOE_ARCHS:
            return
        experts, per_token = self.experts
        require(
            1 <= per_token <= experts,
            f"model.experts_per_token ({per_token}) must be between 1 and model.n_experts ({experts})",
        )
        coef = self.router_aux_loss_coef
        require(coef is None or coef >= 0, f"model.router_aux_loss_coef must be >= 0, got {coef}")

    def check_init_from(self) -> None:
        """A well-formed init_from, and none of the settings its folder decides given a value of their own."""
        value = str(self.init_from)
        require(bool(value.strip()), "model.init_from must be a Hugging Face model folder or run:RUN[@STEP], got ''")
        parse_init_run(value)
        default = ModelConfig()
        for name in FOLDER_DECIDED:
            require(
                getattr(self, name) == getattr(default, name),
                f"model.{name}={getattr(self, name)} is ignored with model.init_from={value} (the model's own "
                f"config decides it); remove it (and any model=... choice)",
            )


@dataclass
class TaskConfig:
    """What the model learns; chosen by the `task` config group."""

    name: str = "causal_lm"
    # task=classification: the class names in class-id order. The driver fills them in from the data's label
    # map (a value given here must equal it), so the run's saved config carries them to eval, predict and export.
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        one_of("task.name", self.name, tuple(TASK_NEEDS))
        if self.labels is not None:
            require(
                self.name == "classification",
                f"task.labels is read only by task=classification, not task={self.name}; remove it",
            )
            require(len(self.labels) > 0, "task.labels must name at least one class (or be left unset)")
            require(len(set(self.labels)) == len(self.labels), f"task.labels must not repeat a name, got {self.labels}")


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

    def grad_accum(self, data_parallel: int) -> int:
        """Micro-batches each of `data_parallel` workers accumulates per optimizer step (checked)."""
        return check_batch(self.global_batch, self.micro_batch, data_parallel)


@dataclass
class CheckpointConfig:
    """How checkpoints are written and kept (how often: train.checkpoint_every).

    `async_upload` is the key users type as `checkpoint.async` (Python reserves the word `async`;
    orchestrator/config.py translates the spelling at the edge): uploads run in the background while
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


@dataclass
class WorkerConfig:
    """Everything a training worker reads: what to train, on what data, how, and where to keep it."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        # With model.init_from the folder decides the architecture (the driver checks it fits the task) and the
        # positions (the driver checks seq_len against them).
        if self.model.init_from is None:
            problem = arch_error(self.task.name, self.model.arch)
            require(problem is None, str(problem))
        require(
            not self.model.lora.enabled or self.strategy.name in LORA_STRATEGIES,
            f"model.lora with strategy={self.strategy.name}: LoRA on a strategy peft cannot shard; use one of "
            f"{', '.join(LORA_STRATEGIES)}",
        )
        require(
            not self.model.compile or self.strategy.name in COMPILE_STRATEGIES,
            f"model.compile with strategy={self.strategy.name}: ZeRO-3 gathers each layer's parameters in hooks that "
            f"split every compiled graph; use one of {', '.join(COMPILE_STRATEGIES)} (fsdp also shards parameters) "
            "or model.compile=false",
        )
        require(
            self.model.init_from is not None or self.data.seq_len <= self.model.n_positions,
            f"data.seq_len ({self.data.seq_len}) must be <= model.n_positions ({self.model.n_positions})",
        )

    @property
    def run_id(self) -> str:
        """The run's id (the driver always sets it before a worker starts)."""
        require(self.run.id is not None, "run.id is unset: the driver names the run before workers start")
        return str(self.run.id)

    @property
    def run_url(self) -> str:
        """The run's folder on storage."""
        return run_folder.run_url(self.storage.root, self.run_id)
