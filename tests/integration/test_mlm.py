"""Masked-LM pretraining as a user meets it: `kiln prepare` some text, `kiln train task=mlm model=bert_tiny`
on 2 workers until masked-token accuracy clearly rises; a run whose driver is killed mid-way and
resumed logs the uninterrupted run's losses exactly (its masks come from each row's stream position); `kiln
eval` equals the logged metrics; `kiln export` gives a BertForMaskedLM that fills masks in transformers; and
the causal-only commands and a causal model refuse in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.failpoints import Failpoints
from tests.helpers import kiln, kiln_refused, prepare_rows, rows, torchrun
from tests.integration.ft_harness import assert_same_losses, kill_tree, start_kiln

pytestmark = pytest.mark.slow

NO_CLUSTER = {"RAY_ADDRESS": "127.0.0.1:9"}  # a stale cluster address: an embedded run starts its own Ray
STEPS = 80
MLM_RUN = [
    "task=mlm",
    "model=bert_tiny",
    "data=prepared",
    "data.seq_len=64",
    "train.global_batch=32",
    "train.micro_batch=16",
    f"train.max_steps={STEPS}",
    "train.eval_every=40",
    "train.eval_batches=2",
    "optim.lr=2e-3",
    "optim.warmup_steps=4",
    "cluster.num_workers=2",
    "tracker=none",
]
WORDS = [
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"),
    *("mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey"),
    *("xray", "yankee", "zulu", "cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "red", "blue", "green"),
]


def document(rng: random.Random) -> str:
    """A document about one word, longer than a sequence: a hidden token is given away by its context (the
    rest of the sequence), not by how common it is."""
    word = rng.choice(WORDS)
    return " ".join(" ".join([word] * 10) + "." for _ in range(8))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """2,000 documents prepared for pretraining (the tokenizer gets the mask token)."""
    rng = random.Random(0)
    rows = [{"text": document(rng)} for _ in range(2000)]
    return prepare_rows(tmp_path_factory.mktemp("mlm"), rows, "seq_len=64", "vocab_size=300", "val_fraction=0.1")


@pytest.fixture(scope="module")
def mlm_run(text_data, tmp_path_factory) -> Path:
    """Run `m`: 80 MLM steps on 2 torchrun workers, evaluated at 0/40/80, checkpointed every 20 (the killed and
    resumed run below is on the embedded Ray: the two launchers give the same losses)."""
    root = tmp_path_factory.mktemp("runs")
    torchrun(*MLM_RUN, f"data.path={text_data}", "train.checkpoint_every=20", "run.id=m", f"storage.root={root}")
    return root / "m"


def test_masked_token_accuracy_clearly_rises(mlm_run):
    evaluations = [r for r in rows(mlm_run) if "val/mlm_accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 40, STEPS]
    accuracy = [r["val/mlm_accuracy"] for r in evaluations]
    loss = [r["val/loss"] for r in evaluations]
    print(f"val/mlm_accuracy at 0/40/{STEPS}: {accuracy}; val/loss: {loss}")
    assert accuracy[0] < 0.05 and accuracy[2] > accuracy[0] + 0.15, accuracy
    assert loss[2] < loss[1] < loss[0], loss
    assert evaluations[2]["val/perplexity"] < evaluations[0]["val/perplexity"]


def test_a_run_killed_mid_way_and_resumed_logs_identical_losses(mlm_run, text_data, tmp_path):
    root = tmp_path / "runs"
    points = Failpoints(tmp_path / "fp", "loop.after_step(step=33,rank=0)=pause")  # held mid-run, after commit 30
    run = start_kiln(
        "train",
        *MLM_RUN,
        f"data.path={text_data}",
        "train.checkpoint_every=10",
        "run.id=k",
        f"storage.root={root}",
        "cluster.max_failures=0",
        log=tmp_path / "train.log",
        env={**NO_CLUSTER, **points.env},
    )
    points.wait("loop.after_step", proc=run)
    kill_tree(run.pid)  # the driver and the Ray it started, mid-run
    killed_at = max(r["step"] for r in rows(root / "k"))
    assert 30 <= killed_at < 33 and (root / "k" / "checkpoints" / "step_000030" / "MANIFEST.json").exists()
    resumed = kiln("resume", "k", "--storage-root", str(root), env=NO_CLUSTER, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    print(f"killed after step {killed_at}, resumed from a committed checkpoint")
    # every train/loss logged (steps re-run after the kill included) equals the uninterrupted run's, bit for bit
    assert_same_losses(rows(root / "k"), rows(mlm_run), steps=range(1, STEPS + 1))


def test_eval_equals_the_logged_metrics_and_the_export_fills_masks(mlm_run, text_data, tmp_path):
    root = str(mlm_run.parent)
    result = kiln("eval", "m", "--json", "--storage-root", root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["step"] == STEPS and set(report["metrics"]) == {"val/loss", "val/perplexity", "val/mlm_accuracy"}
    for name, value in report["metrics"].items():
        assert value == pytest.approx(report["logged"][name], rel=1e-6), name

    out = tmp_path / "hf"
    exported = kiln("export", "m", "--out", str(out), "--storage-root", root)
    assert exported.returncode == 0, exported.stderr[-3000:]
    from transformers import AutoTokenizer, BertForMaskedLM, pipeline

    model = BertForMaskedLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.architectures == ["BertForMaskedLM"] and tokenizer.mask_token == "<|mask|>"
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    guesses = fill("fox fox fox fox<|mask|> fox fox.", top_k=3)
    print("fill-mask guesses:", [g["token_str"] for g in guesses])
    assert len(guesses) == 3 and guesses[0]["token_str"].strip() == "fox"  # read from the context

    folder = kiln("eval", str(out), "--data", str(text_data), "--batches", "2", "--json")
    assert folder.returncode == 0, folder.stderr[-3000:]
    assert set(json.loads(folder.stdout)["metrics"]) == {"val/loss", "val/perplexity", "val/mlm_accuracy"}

    for command in (["generate", "m", "--prompt", "the"], ["chat", str(out)]):
        refused = kiln_refused(*command, "--storage-root", root) if command[0] == "generate" else kiln_refused(*command)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-2000:]
        assert "is for causal LMs" in refused.stderr and "task=mlm model" in refused.stderr


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=gpt2_tiny"], "task.name=mlm does not train model.arch=gpt2 models"),
        (["model.arch=gpt2"], "choose model=bert_tiny or model=bert_small"),
    ],
)
def test_a_causal_model_for_mlm_is_refused_in_one_line(text_data, tmp_path, overrides, expected):
    result = kiln_refused("train", *MLM_RUN, f"data.path={text_data}", *overrides, f"storage.root={tmp_path}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert expected in result.stderr
