"""The README's story: `kiln train experiment=quickstart` on an embedded Ray, then inspect the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY, kiln
from tests.wandb_reader import config as wandb_config
from tests.wandb_reader import history
from trainers.checkpoint.store import verify

pytestmark = pytest.mark.slow

AWS_SECRET = "AWSsecretDoNotLeak1234567890"
WANDB_KEY = "wandbkeyDoNotLeak0987654321abcdef"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> tuple[Path, object]:
    """A shortened quickstart (30 steps, 2 Ray workers) with secrets in the environment."""
    root = tmp_path_factory.mktemp("runs")
    result = kiln(
        "train",
        "experiment=quickstart",
        *TINY,
        "run.id=qs",
        f"storage.root={root}",
        "train.max_steps=30",
        "train.eval_every=15",
        "train.checkpoint_every=15",
        "optim.lr=3e-3",
        "cluster.max_failures=0",
        env={
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEDONOTLEAK",
            "WANDB_API_KEY": WANDB_KEY,
            "WANDB_MODE": "offline",
            # A cluster address left in the environment (a dead one): an embedded run starts its own Ray.
            "RAY_ADDRESS": "127.0.0.1:9",
        },
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root / "qs", result


def test_loss_falls_and_perplexity_is_printed(finished_run):
    run_dir, result = finished_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    val = [r["val/perplexity"] for r in rows if "val/perplexity" in r]
    assert [r["step"] for r in rows if "val/perplexity" in r] == [0, 15, 30]
    assert val[-1] < val[0] * 0.7
    assert "validation perplexity:" in result.stdout and "at step 0 ->" in result.stdout
    for key in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s"):
        assert all(key in r for r in rows if "train/loss" in r), key


def test_committed_checkpoints_verify(finished_run):
    run_dir, _ = finished_run
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step_000015", "step_000030"]
    manifest = verify(str(run_dir / "checkpoints" / "step_000030"))
    assert manifest["step"] == 30 and manifest["world_size"] == 2 and manifest["strategy"] == "ddp"
    paths = {f["path"] for f in manifest["files"]}
    assert {"extra/rank_00000.pt", "extra/rank_00001.pt"} <= paths
    assert any(p.startswith("shards/") for p in paths)


def test_status_json_answers(finished_run):
    run_dir, _ = finished_run
    result = kiln("status", "qs", "--json", "--storage-root", str(run_dir.parent))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["run_id"] == "qs" and status["state"] == "SUCCEEDED"
    assert status["step"] == 30 and status["max_steps"] == 30
    assert status["checkpoint"] == {"step": 30, "uri": str(run_dir / "checkpoints" / "step_000030")}
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "val/loss",
        "val/perplexity",
    ):
        assert isinstance(status["metrics"][key], float), key
    assert status["wandb"] == {"mode": "offline", "run_id": "qs", "dir": str(run_dir / "wandb")}
    table = kiln("runs", "--storage-root", str(run_dir.parent))
    assert "qs" in table.stdout and "SUCCEEDED" in table.stdout
    human = kiln("status", "qs", "--storage-root", str(run_dir.parent))
    assert "last committed checkpoint" in human.stdout


def test_wandb_offline_run_holds_the_metrics(finished_run):
    run_dir, _ = finished_run
    files = list((run_dir / "wandb").glob("offline-run-*/run-qs.wandb"))
    assert len(files) == 1
    logged = history(files[0])
    steps = [row["_step"] for row in logged]
    assert steps[0] == 0 and steps[-1] == 30
    last = logged[-1]
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train/loss"] == pytest.approx(metrics["train/loss"])
    assert last["val/perplexity"] == pytest.approx(metrics["val/perplexity"])
    assert wandb_config(files[0])["train"]["max_steps"] == 30


def test_run_folder_layout_and_worker_logs(finished_run):
    run_dir, result = finished_run
    for name in (
        "run.json",
        "config.yaml",
        "metrics.jsonl",
        "tokenizer/tokenizer.json",
        "logs/worker_0.log",
        "logs/worker_1.log",
    ):
        assert (run_dir / name).is_file(), name
    # a worker's own lines go to its log file, not to the driver's terminal
    assert "rank 1/2" in (run_dir / "logs" / "worker_1.log").read_text()
    assert "rank 1/2" not in result.stdout + result.stderr


def test_kiln_logs_prints_a_workers_log_and_says_where_a_local_drivers_log_is(finished_run):
    run_dir, _ = finished_run
    root = str(run_dir.parent)
    worker = kiln("logs", "qs", "--rank", "1", "--storage-root", root)
    assert worker.returncode == 0 and worker.stdout == (run_dir / "logs" / "worker_1.log").read_text()
    missing = kiln("logs", "qs", "--rank", "7", "--storage-root", root)
    assert missing.returncode == 2 and "no log for rank 7" in missing.stderr and "worker_0.log" in missing.stderr
    driver = kiln("logs", "qs", "--storage-root", root)
    assert driver.returncode == 2 and "was not submitted to a cluster" in driver.stderr
    assert "kiln logs qs --rank N (N from 0 to 1)" in driver.stderr
    # --follow of a run that has ended prints the log once and returns
    followed = kiln("logs", "qs", "--rank", "0", "--follow", "--storage-root", root, timeout=60)
    assert followed.returncode == 0 and followed.stdout == (run_dir / "logs" / "worker_0.log").read_text()


def test_secrets_in_the_environment_reach_no_file_the_run_wrote(finished_run):
    run_dir, _ = finished_run
    checked = 0
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            checked += 1
            for secret in (AWS_SECRET, WANDB_KEY, "AKIAEXAMPLEDONOTLEAK"):
                assert secret.encode() not in data, f"{secret[:6]}... leaked into {path}"
    assert checked > 20


def test_a_failing_worker_fails_the_run_with_one_clear_line(tmp_path, cache_dir):
    result = kiln(
        "train",
        "experiment=quickstart",
        *TINY,
        "run.id=boom",
        f"storage.root={tmp_path}",
        "optim.lr=1e12",
        "optim.grad_clip=0",
        "train.max_steps=20",
        "cluster.max_failures=0",
        "tracker=none",
        timeout=600,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "run boom failed: FloatingPointError: loss is" in result.stderr
    assert "lower optim.lr" in result.stderr and str(tmp_path / "boom" / "logs") in result.stderr
    record = json.loads((tmp_path / "boom" / "run.json").read_text())
    assert record["state"] == "FAILED" and "FloatingPointError" in record["error"]


def test_kiln_plot_draws_the_runs_curves_and_kiln_compare_tabulates_them(finished_run, tmp_path):
    from PIL import Image

    run_dir, _ = finished_run
    out = tmp_path / "plots"
    result = kiln("plot", "qs", "--out", str(out), "--storage-root", str(run_dir.parent))
    assert result.returncode == 0, result.stderr
    drawn = {}
    for path in sorted(out.iterdir()):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 600
            description = json.loads(image.text["Description"])
        drawn[path.name] = {(s["metric"], s["points"]) for s in description["series"]}
    # On CPU there is no peak FLOPs figure, so no MFU chart; an accuracy chart from val/accuracy.
    assert drawn == {
        "loss.png": {("train/loss", 30), ("val/loss", 3)},
        "lr.png": {("train/lr", 30)},
        "throughput.png": {("perf/tokens_per_s", 30)},
        "accuracy.png": {("val/accuracy", 3)},
    }

    compared = kiln("compare", "qs", "--json", "--storage-root", str(run_dir.parent))
    table = json.loads(compared.stdout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_losses = [r["val/loss"] for r in rows if "val/loss" in r]
    assert table["val/loss"]["qs"]["final"] == val_losses[-1] and table["val/loss"]["qs"]["best"] == min(val_losses)
    assert "perf/mfu" not in table
    text = kiln("compare", "qs", "--storage-root", str(run_dir.parent)).stdout
    assert "val/loss" in text and "@30" in text

    unknown = kiln("plot", "nosuchrun", "--storage-root", str(run_dir.parent))
    assert unknown.returncode == 2 and "nosuchrun" in unknown.stderr and unknown.stderr.count("\n") == 1
