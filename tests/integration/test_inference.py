"""`kiln eval` and `kiln generate` on a tiny trained run: the logged metrics reproduced from a checkpoint and
from its export, greedy and seeded generation, prompts from stdin, BLEU/chrF as sacrebleu computes them,
and each bad input as one line with exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import LLAMA_TINY, REPO, kiln, rows, torchrun_command

pytestmark = pytest.mark.slow

PROMPTS = ["def main(", "import os"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir) -> Path:
    """A 1-worker torchrun run: 60 steps, checkpoints and evaluations at 30 and 60."""
    root = tmp_path_factory.mktemp("inference")
    overrides = [
        *LLAMA_TINY,
        "tracker=none",
        "model.dropout=0.1",
        "train.max_steps=60",
        "optim.lr=3e-3",
        "train.checkpoint_every=30",
        "train.eval_every=30",
        "run.id=inf",
        f"storage.root={root}",
    ]
    cmd = torchrun_command("-m", "orchestrator.torchrun", *overrides, nproc=1)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "inf"


def at(run_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`kiln ARGS --storage-root ROOT` for the run's storage root."""
    if stdin is None:
        return kiln(*args, "--storage-root", str(run_dir.parent))
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "kiln"), *args, "--storage-root", str(run_dir.parent)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def logged_val(run_dir: Path, step: int) -> dict[str, float]:
    (row,) = [r for r in rows(run_dir) if r["step"] == step and "val/loss" in r]
    return {k: v for k, v in row.items() if k.startswith("val/")}


def test_eval_at_a_step_equals_what_the_run_logged_there(run):
    result = json.loads(ok(at(run, "eval", "inf", "--step", "30", "--json")))
    logged = logged_val(run, 30)
    assert result["step"] == 30 and result["world_size"] == 1 and result["sequences"] == 8
    assert set(result["metrics"]) == set(logged)  # every metric the task logs, whatever it adds later
    for key, value in logged.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-5), key


def test_eval_of_the_exported_folder_on_the_same_slice_gives_the_same_numbers(run, tmp_path):
    out = tmp_path / "hf"
    ok(at(run, "export", "inf", "--out", str(out)))  # the newest checkpoint: step 60
    dataset = json.loads(ok(at(run, "eval", "inf", "--json")))["data"]  # the run's own dataset
    result = json.loads(ok(kiln("eval", str(out), "--data", dataset, "--micro-batch", "4", "--batches", "2", "--json")))
    assert result["model"] == f"folder {out}" and result["sequences"] == 8
    for key, value in logged_val(run, 60).items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-5), key


def test_greedy_generation_is_deterministic_and_seeded_sampling_reproducible(run):
    args = ("generate", "inf", "--prompt", PROMPTS[0], "--max-new-tokens", "12")
    first, second = ok(at(run, *args)), ok(at(run, *args))
    assert first == second and first.strip()
    sampled = [ok(at(run, *args, "--temperature", "1.5", "--top-k", "50", "--seed", "7")) for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != first


def test_prompts_from_stdin_give_one_completion_each(run):
    out = ok(at(run, "generate", "inf", "--prompt", "-", "--max-new-tokens", "12", stdin="\n".join(PROMPTS) + "\n"))
    assert len(out.splitlines()) == 2


def test_bleu_and_chrf_equal_sacrebleu_on_what_generate_writes(run, tmp_path):
    import sacrebleu

    lines = ok(
        at(run, "generate", "inf", "--prompt", "-", "--json", "--max-new-tokens", "12", stdin="\n".join(PROMPTS))
    ).splitlines()
    outputs = [json.loads(line) for line in lines]
    assert [o["prompt"] for o in outputs] == PROMPTS
    completions = [o["completion"] for o in outputs]
    references = [completions[0][: len(completions[0]) // 2] + " x", "import sys"]  # partly overlapping
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in zip(PROMPTS, references, strict=True))
    )
    result = json.loads(ok(at(run, "eval", "inf", "--data", str(pairs), "--max-new-tokens", "12", "--json")))
    assert result["examples"] == 2
    assert result["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(completions, [references]).score)
    assert result["metrics"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(completions, [references]).score)
    assert result["metrics"]["chrf"] > 0


def test_multi_worker_runs_evaluate_every_workers_slice_and_match_the_log(trained_runs):
    run_dir = trained_runs("ddp")  # the session's 2-worker reference run (evaluated at steps 10 and 20)
    result = json.loads(ok(at(run_dir, "eval", "ddp", "--step", "10", "--json")))
    assert result["world_size"] == 2 and result["sequences"] == 16
    for key, value in logged_val(run_dir, 10).items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-5), key


def error_of(capsys, *argv: str) -> str:
    """Run the CLI in this process; it must fail with exit 2 and one line on stderr."""
    from orchestrator.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    root = str(run.parent)
    assert "unknown run 'nope'" in error_of(capsys, "eval", "nope", "--storage-root", root)
    assert "no checkpoint at step 7" in error_of(
        capsys, "generate", "inf", "--prompt", "x", "--step", "7", "--storage-root", root
    )
    not_hf = error_of(capsys, "eval", str(tmp_path), "--storage-root", root)
    assert str(tmp_path) in not_hf and "not a Hugging Face model folder" in not_hf
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "a"}\n')
    assert f"{bad} line 2" in error_of(capsys, "eval", "inf", "--data", str(bad), "--storage-root", root)
    bare = tmp_path / "bare"
    shutil.copytree(run, bare / "inf")
    for manifest in (bare / "inf" / "checkpoints").glob("*/MANIFEST.json"):
        manifest.unlink()
    assert "run inf has no committed checkpoint" in error_of(capsys, "eval", "inf", "--storage-root", str(bare))


def test_eval_refuses_a_slice_larger_than_the_datasets_val_split(run, capsys):
    root = str(run.parent)
    dataset = json.loads(ok(at(run, "eval", "inf", "--json")))["data"]
    message = error_of(capsys, "eval", "inf", "--data", dataset, "--batches", "100000", "--storage-root", root)
    assert "--batches 100000" in message and "ask for fewer" in message
