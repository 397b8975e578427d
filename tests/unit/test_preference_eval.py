"""`kiln eval RUN --data PAIRS` of a task=dpo run, in this process: a preference file is told from a prompt/reference
one by its first good record, read as `kiln prepare kind=preference` stores it (bad records listed by file:line,
identical answers refused), and scored against the reference with the adapters off; a run of another task, a folder,
or a file without a usable pair is refused in one line before any model loads."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import Dataset
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.stream import SplitReader
from orchestrator.config import compose_config, to_yaml
from orchestrator.run.registry import RunRecord, RunRegistry
from tests.helpers import kiln_refused, tiny_llama
from tests.tokenizer_folders import LLAMA3, save_tokenizer
from trainers.config import DpoConfig, LoraConfig
from trainers.inference.loaded_model import InferenceError
from trainers.inference.preference import (
    holds_preference_pairs,
    pair_batches,
    preference_metrics,
    read_preferences,
    records_input,
)
from trainers.lora import apply_lora
from trainers.tasks.dpo import DPO

SEQ_LEN = 24
DPO_RUN = ["task=dpo", "data=prepared", "data.path=/datasets/pairs", "model.init_from=/models/base"]


def sums(count: int) -> list[dict]:
    return [{"prompt": f"what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": " no."} for i in range(count)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    return save_tokenizer(LLAMA3, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    return bpe.load(str(tokenizer_folder))


def test_a_file_is_read_as_pairs_when_its_first_good_record_has_chosen_and_rejected(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", ["{not json", *sums(2)])
    bleu = write_jsonl(tmp_path / "bleu.jsonl", [{"prompt": "a", "reference": "b"}, *sums(1)])
    assert holds_preference_pairs(str(pairs)) and not holds_preference_pairs(str(bleu))
    csv = tmp_path / "pairs.csv"
    csv.write_text('prompt,chosen,rejected\n"what is 1 plus 1?", 2., no.\n')
    assert records_input(str(csv)) and holds_preference_pairs(str(csv))
    assert not holds_preference_pairs(str(tmp_path / "missing.jsonl"))  # left for the prompt/reference reader to name
    assert not records_input(str(tmp_path))  # a folder without state.json: a prepared dataset


def test_a_file_is_encoded_and_cut_as_prepare_stores_it_and_its_bad_records_are_listed(
    tmp_path, tokenizer, tokenizer_folder
):
    long_prompt = {"prompt": "what is " * 40 + "2?", "chosen": " 2.", "rejected": " 3."}  # fills seq_len: dropped
    long_answer = {
        "prompt": "say it:",
        "chosen": " one two three four five six seven eight nine ten" * 3,
        "rejected": " no.",
    }
    rows = [*sums(6), "[1, 2]", {"prompt": "x", "chosen": ""}, long_prompt, long_answer]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    read = read_preferences(str(path), tokenizer, SEQ_LEN)
    assert read.counts() == {"pairs": 7, "bad_records": 2, "truncated": 1, "dropped": 1, "identical": 0}
    assert read.bad_examples[0] == f"{path}:7: expected a JSON object, got list"
    assert read.bad_examples[1].startswith(f"{path}:8: a preference row needs 'prompt', 'chosen' and 'rejected'")

    # the same pairs, prepared: the stored examples are the batches scored here, token for token
    out = str(tmp_path / "out")
    cfg = PrepareConfig(
        input=str(path),
        output=out,
        kind="preference",
        tokenizer=str(tokenizer_folder),
        seq_len=SEQ_LEN,
        val_fraction=0.3,
    )
    prepare(cfg, log=lambda _: None)
    dataset = Dataset(out)
    stored = set()
    for split in ("train", "val"):
        reader = SplitReader(dataset, split, seed=0, shuffle=False)
        for index in range(reader.num_sequences):
            tokens, mask, _, _ = reader.sequence(index)
            stored.add((tuple(tokens.tolist()), tuple(np.asarray(mask).tolist())))
        reader.close()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scored = {
        (tuple(tokens.tolist()), tuple(mask.tolist()))
        for batch in pair_batches(read.pairs, SEQ_LEN, pad, 3)
        for tokens, mask in zip(batch.tokens, batch.loss_mask, strict=True)
    }
    assert scored == stored and len(stored) == 7


def test_a_pair_with_identical_answers_once_the_eos_is_appended_is_refused_naming_its_line(tmp_path, tokenizer):
    same = {"prompt": "q", "chosen": " a", "rejected": f" a{tokenizer.eos_token}"}  # TRL appends the EOS to " a"
    path = write_jsonl(tmp_path / "pairs.jsonl", [*sums(2), same])
    with pytest.raises(InferenceError) as refusal:
        read_preferences(str(path), tokenizer, SEQ_LEN)
    message = str(refusal.value)
    assert message.startswith(f"{path}:3: the chosen and rejected answers are identical") and "\n" not in message


def test_a_file_without_a_usable_pair_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "x", "chosen": "a"}])
    with pytest.raises(InferenceError, match=r"holds no usable preference pair \(1 bad records, 0 whose prompt"):
        read_preferences(str(path), tokenizer, SEQ_LEN)


def test_the_policy_is_scored_against_its_reference_and_lora_adapters_off_are_the_base(tmp_path, tokenizer):
    read = read_preferences(str(write_jsonl(tmp_path / "pairs.jsonl", sums(5))), tokenizer, SEQ_LEN)
    batches = pair_batches(read.pairs, SEQ_LEN, int(tokenizer.eos_token_id), 2)
    task = DPO(dpo=DpoConfig(beta=0.5))
    base = tiny_llama(len(tokenizer), SEQ_LEN)
    at_start = preference_metrics(task, base, base, batches)
    assert {at_start[f"rewards/{name}"] for name in ("chosen", "rejected", "accuracies", "margins")} == {0.0}
    assert at_start["loss"] == pytest.approx(math.log(2)) and at_start["logps/chosen"] < 0

    reference = copy.deepcopy(base)
    policy = apply_lora(base, LoraConfig(r=4))
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)  # a trained adapter: the policy moves off its base
    with_adapters_off = preference_metrics(task, policy, policy, batches)
    against_the_base = preference_metrics(task, policy, reference, batches)
    assert with_adapters_off["rewards/margins"] != 0.0
    for name, value in against_the_base.items():
        assert with_adapters_off[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def fake_run(root: Path, run_id: str, overrides: list[str], tokenizer_folder: Path | None = None) -> None:
    """A run's record and config (and tokenizer) as the driver writes them, without training anything."""
    RunRegistry(str(root)).create(RunRecord(run_id=run_id), to_yaml(compose_config(overrides)))
    if tokenizer_folder is not None:
        save_tokenizer(LLAMA3, root / run_id / "tokenizer")


def refused(*args: str) -> str:
    result = kiln_refused("eval", *args)
    message = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in message, result.stdout + result.stderr
    return message


def test_a_preference_file_is_refused_in_one_line_for_a_run_of_another_task_a_folder_or_with_batches(tmp_path):
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", sums(2)))
    fake_run(tmp_path / "runs", "lm", [])
    fake_run(tmp_path / "runs", "clf", ["task=classification", "data=prepared", "data.path=/datasets/labels"])
    root = ["--storage-root", str(tmp_path / "runs")]
    assert (
        f"{pairs} holds preference pairs (chosen, rejected), scored against the model a task=dpo run started from, "
        'but run lm is a task=causal_lm run: its --data takes a JSONL file of {"prompt", "reference"} rows (BLEU, '
        "chrF) or a prepared dataset (its val split)"
    ) in refused("lm", "--data", pairs, *root)
    assert "but run clf is a task=classification run: its --data takes a prepared dataset" in refused(
        "clf", "--data", pairs, *root
    )
    assert f"give that run's id, not the folder {tmp_path}" in refused(str(tmp_path), "--data", pairs, *root)
    assert "--batches picks batches of a prepared dataset" in refused("lm", "--data", pairs, "--batches", "2", *root)


def test_a_dpo_runs_bad_file_is_refused_before_its_model_loads(tmp_path):
    fake_run(tmp_path / "runs", "dpo", DPO_RUN, tokenizer_folder=tmp_path)  # no checkpoint: nothing could load
    root = ["--storage-root", str(tmp_path / "runs")]
    identical = write_jsonl(tmp_path / "same.jsonl", [*sums(1), {"prompt": "q", "chosen": " a", "rejected": " a"}])
    assert refused("dpo", "--data", str(identical), *root).endswith(
        f"{identical}:2: the chosen and rejected answers are identical: a pair must prefer one answer over another"
    )
    empty = write_jsonl(tmp_path / "bad.jsonl", ["{", {"prompt": "q", "chosen": " a"}])
    assert f"{empty} holds no usable preference pair (2 bad records" in refused("dpo", "--data", str(empty), *root)
