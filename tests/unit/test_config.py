"""A user's typo fails before any worker starts, with one line that names the key and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_pipeline.config import DEFAULT_STORAGE_ROOT, StorageConfig, default_storage_root
from orchestrator.cli import main
from orchestrator.config import (
    CONF_DIR,
    UsageError,
    compose_config,
    finalize,
    group_names,
    leaves,
)
from trainers.config import check_batch
from trainers.task_data import ARCH_MODELS, TASK_ARCHS, TASK_NEEDS


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.max_step=5"], "unknown config key 'train.max_step'; did you mean train.max_steps?"),
        (["trian.max_steps=5"], "did you mean train.max_steps?"),
        (["optim.learning_rate=1e-3"], "unknown config key 'optim.learning_rate'"),
        (["train.max_steps=abc"], "train.max_steps: expected integer, got 'abc'"),
        (["optim.lr=-1"], "optim.lr must be > 0, got -1"),
        (["model.n_embd=100", "model.n_head=3"], "model.n_embd (100) must be divisible by model.n_head (3)"),
        (
            ["train.global_batch=30"],
            "train.global_batch=30 is not divisible by train.micro_batch (8) x cluster.num_workers (2) = 16",
        ),
        (["strategy=ddpp"], "strategy=ddpp: no such option (did you mean strategy=ddp?)"),
        (["tracker.mode=cloud"], "tracker.mode must be one of offline, online, disabled"),
        (["data.seq_len=512"], "data.seq_len (512) must be <= model.n_positions (256)"),
        (["run.id=bad/id"], "run.id must be"),
        (["train.max_steps"], "could not parse override 'train.max_steps'"),
        (["model.lora.alpha=16"], "model.lora.alpha is ignored without LoRA; set model.lora.r"),
        (["model.lora.target_modules=[c_attn]"], "model.lora.target_modules is ignored without LoRA"),
        (["model.lora.r=8"], "model.lora.r=8 needs model.init_from: LoRA adapts a trained model"),
        (["model.lora.r=-1"], "model.lora.r must be >= 1 (or 0/null: no LoRA), got -1"),
        (["model.lora.r=8", "model.init_from=/m", "model.lora.dropout=1.5"], "model.lora.dropout must be in [0, 1)"),
    ],
)
def test_bad_overrides_name_the_key(overrides, expected):
    with pytest.raises(UsageError) as err:
        compose_config(overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


# Options that cannot stand alone, with the least that completes them.
COMPANIONS = {
    # a prepared dataset is a folder `kiln prepare` wrote; composing does not open it
    "data=prepared": ["data.path=/datasets/web"],
    # an empty mixture is refused: one dataset is the least a mixture can be
    "data=mixture": ["data.mixture=[{path: /datasets/web, weight: 1.0}]"],
    # preference pairs `kiln prepare kind=preference` wrote, and the model training starts from (its reference)
    "task=dpo": ["data=prepared", "data.path=/datasets/pairs", "model.init_from=/models/base"],
}


def companions(choice: str) -> list[str]:
    """The least that completes an option: a model of an arch the default task cannot train needs a task that
    can, a task that cannot train the default model (a GPT-2) needs a model it can."""
    group, option = choice.split("=")
    if group == "model":
        arch = option_settings(choice)["model.arch"]
        if arch in TASK_ARCHS["causal_lm"]:
            return []
        task = next((t for t in TASK_NEEDS if arch in TASK_ARCHS.get(t, ())), None)
        assert task is not None, f"conf/model/ offers model.arch={arch}, which no registered task trains"
        return [f"task={task}"]
    if group == "task" and "gpt2" not in TASK_ARCHS[option]:
        return [f"model={ARCH_MODELS[TASK_ARCHS[option][0]][0]}"]
    return COMPANIONS.get(choice, [])


def options() -> list[str]:
    """`group=option` for every yaml of every config group under conf/."""
    return [f"{group}={path.stem}" for group in group_names() for path in sorted((CONF_DIR / group).glob("*.yaml"))]


def option_settings(choice: str) -> dict:
    """The dotted keys an option file sets, as the composed config must hold them."""
    group, option = choice.split("=")
    path = CONF_DIR / group / f"{option}.yaml"
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    node.pop("defaults", None)
    prefix = "" if "@package _global_" in path.read_text().splitlines()[0] else f"{group}."
    return {prefix + key: value for key, value in leaves(node) if value != "???"}


@pytest.mark.parametrize("choice", options())
def test_every_option_of_every_group_composes_and_takes_effect(choice):
    completing = companions(choice)
    cfg = compose_config([choice, *completing])
    composed = dict(leaves(OmegaConf.to_container(OmegaConf.structured(cfg))))
    completed = {c.split("=", 1)[0] for c in completing}
    settings = {key: value for key, value in option_settings(choice).items() if key not in completed}
    assert settings and {key: composed[key] for key in settings} == settings
    assert cfg.grad_accum >= 1


def test_the_option_list_sees_every_group():
    assert {choice.split("=")[0] for choice in options()} >= {
        "cluster",
        "data",
        "experiment",
        "model",
        "optim",
        "storage",
        "strategy",
        "task",
        "tracker",
        "train",
    }


def test_quickstart_recipe():
    cfg = compose_config(["experiment=quickstart"])
    assert (cfg.cluster.num_workers, cfg.strategy.name, cfg.cluster.address) == (2, "ddp", None)
    assert cfg.model.arch == "gpt2" and cfg.data.source == "stdlib"


@pytest.mark.parametrize("global_batch, micro, workers, accum", [(16, 8, 2, 1), (64, 4, 2, 8), (12, 3, 1, 4)])
def test_batch_math(global_batch, micro, workers, accum):
    assert check_batch(global_batch, micro, workers) == accum


def test_batch_mismatch_suggests_multiples():
    with pytest.raises(UsageError, match=r"use a multiple of 8 \(e.g. 8 or 16\)"):
        compose_config(["train.global_batch=12", "train.micro_batch=4", "cluster.num_workers=2"])


def test_storage_root_env_override_and_absolute_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_STORAGE_ROOT", str(tmp_path / "runs"))
    cfg = finalize(compose_config(["run.id=my-run"]))
    assert cfg.storage.root == str(tmp_path / "runs")
    assert cfg.run.id == "my-run"
    relative = finalize(compose_config(["storage.root=rel-runs"]))
    assert Path(relative.storage.root).is_absolute()


def test_the_yaml_and_the_cli_share_one_default_storage_root(monkeypatch):
    monkeypatch.delenv("KILN_STORAGE_ROOT", raising=False)
    assert compose_config([]).storage.root == default_storage_root() == DEFAULT_STORAGE_ROOT
    assert StorageConfig().root == DEFAULT_STORAGE_ROOT
    monkeypatch.setenv("KILN_STORAGE_ROOT", "s3://bucket/runs")
    assert compose_config([]).storage.root == default_storage_root() == "s3://bucket/runs"


def test_generated_run_ids_are_readable_and_unique():
    ids = {finalize(compose_config(["experiment=quickstart"])).run.id for _ in range(5)}
    assert len(ids) == 5
    assert all(i.startswith("quickstart-") for i in ids)


def test_status_of_unknown_run_exits_2(tmp_path, capsys):
    assert main(["status", "no-such-run", "--storage-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown run 'no-such-run'" in err and str(tmp_path) in err
