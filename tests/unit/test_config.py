"""A user's typo fails before any worker starts, with one line that names the key and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import CONF_DIR, UsageError, check_batch, compose_config, finalize
from tests.conftest import kiln


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
    ],
)
def test_bad_overrides_name_the_key(overrides, expected):
    with pytest.raises(UsageError) as err:
        compose_config(overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_every_experiment_composes():
    experiments = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    assert "quickstart" in experiments
    for name in experiments:
        cfg = compose_config([f"experiment={name}"])
        assert cfg.run.name == name
        assert cfg.grad_accum >= 1


def test_quickstart_recipe():
    cfg = compose_config(["experiment=quickstart"])
    assert (cfg.cluster.num_workers, cfg.strategy.name, cfg.cluster.address) == (2, "ddp", None)
    assert cfg.model.arch == "gpt2" and cfg.data.source == "stdlib"


@pytest.mark.parametrize("global_batch, micro, workers, accum", [(16, 8, 2, 1), (64, 4, 2, 8), (12, 3, 1, 4)])
def test_batch_math(global_batch, micro, workers, accum):
    assert check_batch(global_batch, micro, workers) == accum


def test_batch_mismatch_suggests_multiples():
    with pytest.raises(UsageError, match=r"use a multiple of 8 \(e.g. 8 or 16\)"):
        check_batch(12, 4, 2)


def test_storage_root_env_override_and_absolute_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_STORAGE_ROOT", str(tmp_path / "runs"))
    cfg = finalize(compose_config(["run.id=my-run"]))
    assert cfg.storage.root == str(tmp_path / "runs")
    assert cfg.run.id == "my-run"
    relative = finalize(compose_config(["storage.root=rel-runs"]))
    assert Path(relative.storage.root).is_absolute()


def test_generated_run_ids_are_readable_and_unique():
    ids = {finalize(compose_config(["experiment=quickstart"])).run.id for _ in range(5)}
    assert len(ids) == 5
    assert all(i.startswith("quickstart-") for i in ids)


def test_cli_usage_error_is_one_line_exit_2_and_starts_no_ray(tmp_path):
    result = kiln("train", "experiment=quickstart", "train.max_step=5", f"storage.root={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "train.max_steps" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing was registered, no Ray started


def test_status_of_unknown_run_exits_2(tmp_path, capsys):
    assert main(["status", "no-such-run", "--storage-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown run 'no-such-run'" in err and str(tmp_path) in err
