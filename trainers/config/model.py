"""The model section: ModelConfig and its LoRA adapters, the arch families' keys, and `model.init_from` parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from trainers.config.checks import RUN_ID_PATTERN, one_of, require
from trainers.task_data import ARCH_MODELS

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
