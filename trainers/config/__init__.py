"""The typed config a training worker runs on: its sections and `WorkerConfig`, the whole of them.

Each section validates itself in ``__post_init__`` (OmegaConf calls it when the composed config is
turned into objects), so a bad value fails on the driver before any worker starts. Errors name the
field as a user types it on the command line. The orchestrator's root schema (`KilnConfig`) is a
`WorkerConfig` plus where the workers run (`cluster`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config import DataConfig, StorageConfig
from trainers.config.checks import RUN_ID_PATTERN, ConfigError, check_batch, one_of, require
from trainers.config.dpo import DPO_LOSSES, DpoConfig, check_dpo
from trainers.config.model import (
    DECODER_ARCHS,
    DECODER_KEYS,
    FOLDER_DECIDED,
    INIT_FROM_RUN,
    INIT_FROM_RUN_PATTERN,
    MOE_ARCHS,
    MOE_KEYS,
    LoraConfig,
    ModelConfig,
    parse_init_run,
)
from trainers.config.parallel import MeshShape, ParallelConfig, check_parallel
from trainers.config.training import (
    COMPILE_STRATEGIES,
    LORA_STRATEGIES,
    STRATEGY_NAMES,
    CheckpointConfig,
    OptimConfig,
    StrategyConfig,
    TrackerConfig,
    TrainConfig,
)
from trainers.run import folder as run_folder
from trainers.task_data import TASK_NEEDS, arch_error

__all__ = [
    "COMPILE_STRATEGIES",
    "DECODER_ARCHS",
    "DECODER_KEYS",
    "DPO_LOSSES",
    "FOLDER_DECIDED",
    "INIT_FROM_RUN",
    "INIT_FROM_RUN_PATTERN",
    "LORA_STRATEGIES",
    "MOE_ARCHS",
    "MOE_KEYS",
    "RUN_ID_PATTERN",
    "STRATEGY_NAMES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DpoConfig",
    "LoraConfig",
    "MeshShape",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunSection",
    "StorageConfig",
    "StrategyConfig",
    "TaskConfig",
    "TrackerConfig",
    "TrainConfig",
    "WorkerConfig",
    "check_batch",
    "one_of",
    "parse_init_run",
    "require",
]


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
class WorkerConfig:
    """Everything a training worker reads: what to train, on what data, how, and where to keep it."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)  # task=dpo's beta, loss and label smoothing

    def __post_init__(self) -> None:
        check_dpo(self.dpo, task=self.task.name, init_from=self.model.init_from, data_source=self.data.source)
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
        from_config = self.model.init_from is None  # else the folder decides the arch and heads
        check_parallel(
            self.parallel,
            strategy=self.strategy.name,
            arch=self.model.arch if from_config else None,
            task=self.task.name,
            lora=self.model.lora.enabled,
            heads=(self.model.n_head, self.model.n_kv_head or self.model.n_head) if from_config else None,
            compiled=self.model.compile,
        )
        require(
            self.model.init_from is not None or self.data.seq_len <= self.model.n_positions,
            f"data.seq_len ({self.data.seq_len}) must be <= model.n_positions ({self.model.n_positions})",
        )

    def mesh(self, world_size: int) -> MeshShape:
        """The DeviceMesh shape of a world of world_size workers (checked)."""
        return self.parallel.mesh(world_size)

    def grad_accum_at(self, world_size: int) -> int:
        """Micro-batches each rank accumulates per optimizer step with world_size workers (checked)."""
        mesh = self.mesh(world_size)
        ranks = "cluster.num_workers" if mesh.tensor == 1 else "cluster.num_workers / parallel.tensor"
        return self.train.grad_accum(mesh.data_parallel, ranks)

    @property
    def run_id(self) -> str:
        """The run's id (the driver always sets it before a worker starts)."""
        require(self.run.id is not None, "run.id is unset: the driver names the run before workers start")
        return str(self.run.id)

    @property
    def run_url(self) -> str:
        """The run's folder on storage."""
        return run_folder.run_url(self.storage.root, self.run_id)
