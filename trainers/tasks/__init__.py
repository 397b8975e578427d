"""Tasks: what a model learns and how it is scored. Chosen by `task.name`; registered here only.

What each task needs from its data is in trainers/task_data.py (checked on the driver, without torch).
"""

from __future__ import annotations

from torch import nn

from trainers.config import ModelConfig
from trainers.lora import apply_lora
from trainers.pretrained import load_pretrained
from trainers.task_data import PRETRAINED_CLASS
from trainers.tasks.base import Task, on_device
from trainers.tasks.causal_lm import CausalLM
from trainers.tasks.sft import SFT

TASKS: dict[str, type[Task]] = {"causal_lm": CausalLM, "sft": SFT}

__all__ = ["TASKS", "Task", "build_model", "build_task", "on_device", "task_name"]


def build_task(name: str) -> Task:
    """The task registered under name."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"task.name={name!r} is not a known task; choose one of {', '.join(TASKS)}") from None


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
    model = load_pretrained(model_cfg.init_from, PRETRAINED_CLASS[task_name(task)], model_cfg)
    return apply_lora(model, model_cfg.lora) if model_cfg.lora.enabled else model
