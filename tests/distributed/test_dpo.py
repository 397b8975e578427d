"""DPO on 2 torchrun workers, from a trained tiny Llama (run:ddp): its tokenizer prepares the preference pairs, and it
is both the policy's start and its frozen reference. The reference log-probs are computed once, committed with the run
and read back on a resume, never computed again; at step 0 the policy is the reference (every reward exactly 0, the
sigmoid loss log 2); sharded strategies and LoRA compute the same reference; a damaged one stops a resume."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from data_pipeline import tokenizer as bpe
from data_pipeline.prepare import split_of
from tests.failpoints import Failpoints
from tests.helpers import REPO, kiln, kiln_here, kiln_refused, prepare_rows, rows, torchrun, torchrun_command
from trainers.checkpoint.store import verify
from trainers.tasks.preference import PAIR_STATS

pytestmark = pytest.mark.slow

PAIR_KEYS = [f"{split}/{name}" for split in ("train", "val") for name in ("loss", *PAIR_STATS)]
LOG_2 = float(np.float32(math.log(2)))  # the fp32 sigmoid loss of a pair whose log-ratios are equal


def sum_pairs() -> list[dict]:
    """64 "what is A plus B?" pairs: the right sum chosen over a wrong one."""
    rng = random.Random(0)
    pairs = []
    for _ in range(64):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        pairs.append({"prompt": f"what is {a} plus {b}?", "chosen": f" {a + b}.", "rejected": f" {a + b + 7}."})
    return pairs


@pytest.fixture(scope="module")
def root(trained_runs) -> Path:
    """The storage root of run `ddp` (the 20-step tiny Llama every DPO run here starts from, as run:ddp)."""
    return trained_runs("ddp").parent


@pytest.fixture(scope="module")
def dpo_run(root, tmp_path_factory) -> list[str]:
    """Settings of a 4-step DPO run (2 workers x 2 pairs x 2 micro-batches a step), on pairs prepared for run:ddp."""
    folder = tmp_path_factory.mktemp("pairs")
    tokenizer = root / "ddp" / "tokenizer"
    data = prepare_rows(
        folder, sum_pairs(), "kind=preference", f"tokenizer={tokenizer}", "seq_len=32", "val_fraction=0.25"
    )
    settings = ["task=dpo", "data=prepared", f"data.path={data}", "data.seq_len=32", "model.init_from=run:ddp"]
    settings += ["train.global_batch=8", "train.micro_batch=2", "train.eval_batches=1", "train.max_steps=4"]
    settings += ["train.checkpoint_every=2", "train.eval_every=2", "optim.lr=1e-3", "optim.warmup_steps=0"]
    return [*settings, "tracker=none", f"storage.root={root}"]


def train(root: Path, settings: list[str], run_id: str, *overrides: str) -> Path:
    """A finished torchrun DPO run `run_id` under root (started afresh)."""
    shutil.rmtree(root / run_id, ignore_errors=True)
    torchrun(*settings, *overrides, f"run.id={run_id}")
    return root / run_id


def logged(run_dir: Path) -> dict[int, dict]:
    """step -> the train/ and val/ metrics logged there (the last row wins: a resumed step is logged again)."""
    steps: dict[int, dict] = {}
    for row in rows(run_dir):
        steps.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k.startswith(("train/", "val/"))})
    return steps


def reference(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(run_dir / "reference" / "logps.safetensors")


def reference_events(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "events").glob("*-reference-*.json"))]


@pytest.fixture(scope="module")
def ddp(root, dpo_run) -> Path:
    return train(root, dpo_run, "dpo-ddp", "strategy=ddp")


def test_a_dpo_run_starts_at_its_reference_and_logs_trls_metrics(ddp):
    manifest = verify(str(ddp / "reference"))  # committed like a checkpoint: sizes and sha256 checked
    tables = reference(ddp)
    assert manifest["data"]["pairs"] == {split: len(tables[split]) for split in ("train", "val")}
    assert tables["train"].shape[1] == tables["val"].shape[1] == 2 and tables["train"].dtype == np.float32
    assert (tables["train"] < 0).all()  # every answer has tokens: a summed log-prob below 0
    (event,) = reference_events(ddp)
    assert event["computed"] and event["seconds"] > 0 and event["sha256"] == manifest["files"][0]["sha256"]

    steps = logged(ddp)
    start = steps[0]
    assert {start[f"val/rewards/{name}"] for name in ("chosen", "rejected", "accuracies", "margins")} == {0.0}
    assert start["val/loss"] == LOG_2  # each pair's log-ratios are equal: -logsigmoid(0)
    assert set(steps[4]) >= set(PAIR_KEYS) and set(steps[1]) >= {k for k in PAIR_KEYS if k.startswith("train/")}
    assert steps[1]["train/loss"] == pytest.approx(LOG_2, rel=1e-6)  # the first step starts from the reference too
    assert steps[4]["val/rewards/chosen"] != 0.0  # on the same val pairs: the policy has moved off its reference

    # `kiln eval RUN` scores the same validation pairs against the run's committed reference, in one CPU process.
    evaluated = kiln_here("eval", ddp.name, "--json", "--storage-root", str(ddp.parent))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads(evaluated.stdout)["metrics"]
    for name in PAIR_KEYS[len(PAIR_KEYS) // 2 :]:
        assert metrics[name] == pytest.approx(steps[4][name], rel=1e-5, abs=1e-6), name


def val_slice_file(folder: Path, *extra: str) -> Path:
    """The pairs of the DPO run's own evaluation slice as a preference file: its first 4 val pairs (2 workers x 1
    batch x 2 pairs, read in input order), then the extra lines."""
    val = [pair for pair in sum_pairs() if split_of(json.dumps(pair), 0.25) == "val"][:4]
    path = folder / "val_pairs.jsonl"
    path.write_text("".join(f"{line}\n" for line in [*map(json.dumps, val), *extra]))
    return path


def test_kiln_eval_of_a_preference_file_scores_it_as_the_runs_validation_scored_the_same_pairs(ddp, tmp_path):
    storage_root = ["--storage-root", str(ddp.parent)]
    pairs = val_slice_file(tmp_path, '{"prompt": "what is 1 plus 1?"}')
    evaluated = kiln_here("eval", ddp.name, "--data", str(pairs), "--json", *storage_root)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(evaluated.stdout)
    metrics, at_step_4 = result["metrics"], logged(ddp)[4]
    assert result["step"] == 4 and result["bad_examples"] == [
        f"{pairs}:5: a preference row needs 'prompt', 'chosen' and 'rejected'; missing chosen, rejected"
    ]
    assert {k: metrics[k] for k in ("pairs", "bad_records", "truncated", "dropped")} == {
        "pairs": 4,
        "bad_records": 1,
        "truncated": 0,
        "dropped": 0,
    }
    # the policy against the run's init_model, scored here: what the run's evaluation logged from its committed table
    for name in ("loss", *PAIR_STATS):
        assert metrics[name] == pytest.approx(at_step_4[f"val/{name}"], rel=1e-5, abs=1e-6), name
    assert 0 < metrics["rewards/accuracies"] <= 1 and math.isfinite(metrics["rewards/margins"])

    table = kiln_here("eval", ddp.name, "--data", str(pairs), "--step", "2", *storage_root)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "run dpo-ddp step 2" in table.stdout and f"skipped: {pairs}:5: a preference row" in table.stdout
    lines = table.stdout.splitlines()
    assert f"  {'pairs':<22} 4" in lines and any(line.startswith("  rewards/margins ") for line in lines)

    eos = bpe.load(str(ddp / "tokenizer")).eos_token  # " 2." and " 2.<eos>": the same once TRL appends the EOS
    same = val_slice_file(
        tmp_path, json.dumps({"prompt": "what is 1 plus 1?", "chosen": " 2.", "rejected": f" 2.{eos}"})
    )
    message = kiln_refused("eval", ddp.name, "--data", str(same), *storage_root).stderr.strip()
    assert (
        message.endswith(
            f"{same}:5: the chosen and rejected answers are identical once tokenized: a pair must "
            "prefer one answer over another"
        )
        and "\n" not in message
    )
    base = kiln_refused("eval", "ddp", "--data", str(pairs), *storage_root)
    assert base.returncode == 2 and "but run ddp is a task=causal_lm run" in base.stderr


def test_a_killed_dpo_run_resumes_on_one_worker_with_the_uninterrupted_numbers_and_reads_its_reference(
    root, dpo_run, ddp
):
    """Rank 1 dies after step 3 (step 2 committed); the resume runs on 1 worker (2 micro-batches become 4)."""
    run_id = "dpo-killed"
    shutil.rmtree(root / run_id, ignore_errors=True)
    shutil.rmtree(root / f"{run_id}-failpoints", ignore_errors=True)
    points = Failpoints(root / f"{run_id}-failpoints", "loop.after_step(step=3,rank=1)=kill")
    cmd = torchrun_command("-m", "orchestrator.torchrun", *dpo_run, "strategy=ddp", f"run.id={run_id}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **points.env}
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert killed.returncode != 0 and points.arrivals("loop.after_step"), killed.stderr[-2000:]
    run_dir = root / run_id
    artefact = run_dir / "reference" / "logps.safetensors"
    before = (hashlib.sha256(artefact.read_bytes()).hexdigest(), artefact.stat().st_mtime_ns)

    torchrun("--resume", run_id, "--storage-root", str(root), nproc=1)
    assert (hashlib.sha256(artefact.read_bytes()).hexdigest(), artefact.stat().st_mtime_ns) == before
    assert len(reference_events(run_dir)) == 1  # read on the resume, not computed again
    (_, restart) = sorted((run_dir / "events").glob("*-started-*.json"))
    assert json.loads(restart.read_text())["restored_step"] == 2
    assert json.loads(restart.read_text())["world_size"] == 1
    resumed, uninterrupted = logged(run_dir), logged(ddp)
    for step in (3, 4):
        # The same 8 pairs a step, summed in another order (one rank's 4 micro-batches, not two ranks' 2): equal
        # to float32 rounding, not bit for bit. On the same worker count a restart is bit for bit (the Ray story).
        for key in ("train/loss", *(f"train/{name}" for name in PAIR_STATS)):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_a_worker_sigkilled_mid_dpo_on_ray_restarts_with_the_uninterrupted_numbers(root, dpo_run, ddp, tmp_path):
    """kiln train on the embedded Ray: rank 1 is SIGKILLed as its step-2 checkpoint commits; Ray restarts the group,
    which reads the committed reference and goes on from step 2 bit for bit."""
    run_id = "dpo-ray"
    shutil.rmtree(root / run_id, ignore_errors=True)
    points = Failpoints(tmp_path / "fp", "checkpoint.committed(step=2,rank=1)=kill")
    settings = [*dpo_run, "strategy=ddp", "cluster.num_workers=2", "cluster.max_failures=1", f"run.id={run_id}"]
    result = kiln("train", *settings, env=points.env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = root / run_id
    record = json.loads((run_dir / "run.json").read_text())
    first, second = record["attempts"]
    assert first["cause"]["rank"] == 1 and first["cause"]["pid"] == points.arrivals("checkpoint.committed")[0]["pid"]
    assert second["restored_step"] == 2 and second["outcome"] == "SUCCEEDED"
    assert len(reference_events(run_dir)) == 1  # computed by the first group, read by the second
    assert np.array_equal(reference(run_dir)["train"], reference(ddp)["train"])
    restarted, uninterrupted = logged(run_dir), logged(ddp)
    for step in (1, 2, 3, 4):
        train = {k: v for k, v in uninterrupted[step].items() if k.startswith("train/")}
        assert {k: restarted[step][k] for k in train} == train, step  # loss, grad norm, rewards, log-probs


def test_a_damaged_reference_stops_the_resume_in_one_line_naming_it(ddp, tmp_path):
    storage_root = tmp_path / "runs"
    shutil.copytree(ddp, storage_root / ddp.name)
    artefact = storage_root / ddp.name / "reference" / "logps.safetensors"
    data = bytearray(artefact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artefact.write_bytes(bytes(data))
    result = kiln_refused("resume", ddp.name, "train.max_steps=6", "--storage-root", str(storage_root))
    message = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in message, message
    assert f"the reference log-probs of this task=dpo run at {artefact.parent} are damaged" in message
    assert "logps.safetensors does not match its sha256" in message
    assert rows(storage_root / ddp.name) == rows(ddp)  # nothing trained, nothing computed again


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_strategies_compute_ddps_reference_and_first_step(root, dpo_run, ddp, strategy):
    run_dir = train(root, dpo_run, f"dpo-{strategy}", f"strategy={strategy}", "train.max_steps=1")
    for split, table in reference(ddp).items():
        np.testing.assert_allclose(reference(run_dir)[split], table, rtol=0, atol=1e-6)
    steps = logged(run_dir)
    assert {steps[0][f"val/rewards/{name}"] for name in ("chosen", "rejected", "margins")} == {0.0}
    assert steps[1]["train/loss"] == pytest.approx(logged(ddp)[1]["train/loss"], rel=1e-5)


def test_lora_computes_the_reference_of_the_base_with_its_adapters_off(root, dpo_run, ddp, tmp_path):
    run_dir = train(root, dpo_run, "dpo-lora", "strategy=ddp", "model.lora.r=4", "train.max_steps=1")
    assert json.loads((run_dir / "reference" / "MANIFEST.json").read_text())["reference"]["lora"] is True
    for split, table in reference(ddp).items():
        assert np.array_equal(reference(run_dir)[split], table), split

    # kiln eval --data scores the reference with the unmerged checkpoint's adapters off: the logged val numbers
    evaluated = kiln_here(
        "eval", run_dir.name, "--data", str(val_slice_file(tmp_path)), "--json", "--storage-root", str(root)
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics, at_step_1 = json.loads(evaluated.stdout)["metrics"], logged(run_dir)[1]
    for name in ("loss", *PAIR_STATS):
        assert metrics[name] == pytest.approx(at_step_1[f"val/{name}"], rel=1e-5, abs=1e-6), name


def test_dpo_on_other_data_or_from_a_folder_of_another_vocabulary_is_refused_in_one_line(
    root, dpo_run, chat_data, tmp_path
):
    """Both before anything starts, exit 2, naming what to change."""
    chat = [o for o in dpo_run if not o.startswith(("data.path", "data.seq_len"))]
    result = kiln_refused("train", *chat, f"data.path={chat_data}", "data.seq_len=64")
    message = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in message, message
    assert f"task=dpo trains on kind=preference data, but the dataset at {chat_data}" in message, message

    folder = tmp_path / "other-vocabulary"
    exported = kiln_here("export", "ddp", "--out", str(folder), "--storage-root", str(root))
    assert exported.returncode == 0, exported.stderr[-2000:]
    bpe.save(bpe.train_bpe(["a b c d e f"] * 10, vocab_size=300), str(folder))  # another tokenizer.json
    other = [o for o in dpo_run if not o.startswith("model.init_from")]
    result = kiln_refused("train", *other, f"model.init_from={folder}")
    message = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in message, message
    assert f"the tokenizer of model.init_from={folder} (vocabulary of " in message, message
