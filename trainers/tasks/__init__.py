"""Tasks: what a model learns and how it is scored. Chosen by `task.name`; registered here only.

What each task needs from its data is in trainers/task_data.py (checked on the driver, without torch).
"""

from __future__ import annotations

from typing import cast

from torch import nn

from data_pipeline.tokenizer import Vocabulary
from trainers.config import DpoConfig, ModelConfig, TaskConfig
from trainers.lora import apply_lora
from trainers.pretrained import load_pretrained
from trainers.task_data import PRETRAINED_CLASS
from trainers.tasks.base import Task, TaskBase, on_device, task_batch
from trainers.tasks.causal_lm import CausalLM
from trainers.tasks.classification import Classification, label_config
from trainers.tasks.dpo import DPO, disable_dropout
from trainers.tasks.mlm import MaskedLM
from trainers.tasks.sft import SFT

TASKS: dict[str, type[TaskBase]] = {
    "causal_lm": CausalLM,
    "sft": SFT,
    "mlm": MaskedLM,
    "classification": Classification,
    "dpo": DPO,
}

__all__ = ["TASKS", "Task", "build_model", "build_task", "on_device", "task_batch", "task_name"]


def build_task(
    cfg: TaskConfig,
    eos_id: int,
    *,
    seed: int = 0,
    vocabulary: Vocabulary | None = None,
    dpo: DpoConfig | None = None,
) -> Task:
    """The task cfg.name names, with the tokenizer's end-of-text id (classification rows are padded with it), the
    run's seed (train.seed), its tokenizer's ids and, for task=dpo, the dpo section (its defaults when left out).

    Callers that only build or load a model (export) may leave seed and vocabulary out; callers that train or
    score (the loop, kiln eval) pass them: task=mlm draws its masks from them.
    """
    if cfg.name not in TASKS:
        raise ValueError(f"task.name={cfg.name!r} is not a known task; choose one of {', '.join(TASKS)}")
    if cfg.name == "classification":
        return Classification(cfg.labels or [], eos_id, seed, vocabulary)
    if cfg.name == "dpo":
        return DPO(seed, vocabulary, dpo)
    return cast(Task, TASKS[cfg.name](seed, vocabulary))


def task_name(task: Task) -> str:
    """The name a task is registered under."""
    for name, kind in TASKS.items():
        if type(task) is kind:
            return name
    raise ValueError(f"{type(task).__name__} is not a registered task")


def build_model(task: Task, model_cfg: ModelConfig, vocab_size: int, eos_id: int) -> nn.Module:
    """The task's model: from the model.init_from folder (its architecture and weights) when set, else from config.

    Every caller that makes a run's model (the loop, export, inference) comes here, so a run that started
    from a folder is rebuilt with that folder's architecture before its checkpoint is loaded into it. With
    model.lora the folder's weights are the frozen base and LoRA adapters are added here, before any strategy
    wraps the model.
    """
    if model_cfg.init_from is None:
        return task.build_model(model_cfg, vocab_size, eos_id)
    # The data's classes (the driver checked that a classification folder has the same); a new head on a language model.
    if isinstance(task, Classification):
        model = load_pretrained(
            model_cfg.init_from,
            PRETRAINED_CLASS["classification"],
            model_cfg,
            pad_token_id=eos_id,
            **label_config(task.labels),
        )
    else:
        model = load_pretrained(model_cfg.init_from, PRETRAINED_CLASS[task_name(task)], model_cfg)
    if isinstance(task, DPO):
        model = disable_dropout(model)  # before LoRA: model.lora.dropout, if set, still applies
    return apply_lora(model, model_cfg.lora) if model_cfg.lora.enabled else model
