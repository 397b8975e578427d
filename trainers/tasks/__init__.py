"""Tasks: what a model learns and how it is scored. Chosen by `task.name`; registered here only."""

from __future__ import annotations

from trainers.tasks.base import Task
from trainers.tasks.causal_lm import CausalLM

TASKS: dict[str, type[Task]] = {"causal_lm": CausalLM}


def build_task(name: str) -> Task:
    """The task registered under name."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"task.name={name!r} is not a known task; choose one of {', '.join(TASKS)}") from None
