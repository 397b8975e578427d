"""Classification as a user runs it: `kiln prepare kind=classification` on a JSONL of labelled texts whose words
give their class away, `kiln train task=classification` on 2 embedded-Ray workers (GPT-2 with ddp, BERT with
fsdp) until validation accuracy is high, then `kiln eval`, `kiln export` and `kiln predict` agreeing with each
other on the same examples; and the inputs classification refuses, each in one line with exit 2."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.dataset import ShardWriter, write_manifest
from tests.helpers import BIN, REPO, TINY_MODEL, kiln, kiln_refused, prepare_rows, rows, torchrun

pytestmark = pytest.mark.slow

VOCABULARIES = {
    "sports": ["goal", "match", "team", "score", "coach", "league", "player", "stadium"],
    "weather": ["rain", "sunny", "cloud", "storm", "wind", "forecast", "snow", "humid"],
    "food": ["bread", "cheese", "soup", "salad", "pasta", "spice", "bake", "dinner"],
    "music": ["guitar", "song", "drum", "melody", "concert", "piano", "chorus", "album"],
}
FILLER = ["the", "a", "of", "and", "today", "about", "really", "some"]
CLASSIFY = [
    "task=classification",
    "data=prepared",
    "data.seq_len=32",
    *TINY_MODEL,
    "train.eval_batches=10",  # 2 workers x 10 x 4 = 80 of the ~90 val examples
    "optim.warmup_steps=2",
    "tracker=none",
    "cluster.num_workers=2",
    "cluster.max_failures=0",
]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """400 texts of 3-5 words from one class's vocabulary among filler words, prepared (about 90 in val)."""
    rng = random.Random(0)
    rows = []
    for _ in range(400):
        label = rng.choice(sorted(VOCABULARIES))
        words = rng.choices(VOCABULARIES[label], k=rng.randint(3, 5)) + rng.choices(FILLER, k=rng.randint(2, 4))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    settings = ["kind=classification", "seq_len=32", "vocab_size=300", "val_fraction=0.2"]
    return prepare_rows(tmp_path_factory.mktemp("classification"), rows, *settings)


def train(data: Path, root: Path, run_id: str, *overrides: str) -> Path:
    """Run run_id on 2 torchrun workers (what these stories check is the task, not the launcher: Ray's is in
    the fault-tolerance and cluster stories, and gives the same losses)."""
    torchrun(*CLASSIFY, f"data.path={data}", f"run.id={run_id}", f"storage.root={root}", *overrides)
    return root / run_id


def val_examples(data: Path) -> tuple[list[str], list[int]]:
    """Every example of the val split as stored: its text (the tokens before the EOS padding, decoded) and label."""
    from data_pipeline import tokenizer as bpe
    from data_pipeline.dataset import open_dataset

    dataset = open_dataset(str(data))
    tokenizer = bpe.load(dataset.tokenizer_url)
    texts, labels = [], []
    for shard in dataset.shards("val"):
        tokens = np.fromfile(shard.url, dtype=dataset.dtype).reshape(-1, dataset.seq_len)
        labels += np.fromfile(str(shard.labels_url), dtype="<i4").tolist()
        for row in tokens.tolist():
            texts.append(tokenizer.decode(row[: row.index(dataset.eos_id)]))
    return texts, labels


def output(*args: str, stdin: str | None = None) -> str:
    """What a kiln command wrote on stdout (it must succeed)."""
    result = subprocess.run(
        [str(BIN / "kiln"), *args], input=stdin, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def json_lines(*args: str, stdin: str | None = None) -> list[dict]:
    """`kiln predict --json`: one object a line."""
    return [json.loads(line) for line in output(*args, stdin=stdin).splitlines()]


def evaluate(*args: str) -> dict:
    """`kiln eval --json`: one object."""
    return json.loads(output("eval", *args, "--json"))


def test_gpt2_learns_the_classes_and_eval_export_and_predict_agree(labelled, tmp_path):
    root = tmp_path / "runs"
    run = train(
        labelled, root, "gpt", "optim.lr=3e-3", "train.max_steps=60", "train.eval_every=30", "train.checkpoint_every=60"
    )
    evaluations = [r for r in rows(run) if "val/accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 30, 60]
    accuracy = [r["val/accuracy"] for r in evaluations]
    assert accuracy[0] < 0.5 and accuracy[2] >= 0.9, accuracy  # 4 classes: a quarter at first
    assert evaluations[2]["val/f1_macro"] >= 0.9 and evaluations[2]["val/loss"] < evaluations[0]["val/loss"] / 4

    # kiln eval of the run: the logged metrics, from the run's saved config alone (its classes included)
    evaluated = evaluate("gpt", "--storage-root", str(root))
    assert evaluated["metrics"] == pytest.approx({k: evaluations[2][k] for k in evaluated["metrics"]}, rel=1e-6)

    # kiln export: the classes as id2label, loadable by transformers' Auto class
    export = tmp_path / "export"
    result = kiln("export", "gpt", "--storage-root", str(root), "--out", str(export))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    config = json.loads((export / "config.json").read_text())
    assert config["id2label"] == {"0": "food", "1": "music", "2": "sports", "3": "weather"}
    assert config["label2id"] == {"food": 0, "music": 1, "sports": 2, "weather": 3}
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(export, local_files_only=True)
    assert type(loaded).__name__ == "GPT2ForSequenceClassification" and loaded.config.num_labels == 4

    # kiln predict on every val example vs kiln eval on the same examples (the whole val split, once each)
    texts, truth = val_examples(labelled)
    stdin = "".join(f"{text}\n" for text in texts)
    predicted = json_lines("predict", "gpt", "--storage-root", str(root), "--text", "-", "--json", stdin=stdin)
    assert [p["text"] for p in predicted] == texts
    names = config["id2label"]
    predict_accuracy = sum(p["label"] == names[str(t)] for p, t in zip(predicted, truth, strict=True)) / len(truth)
    one_each = ["--data", str(labelled), "--micro-batch", "1", "--batches", str(len(texts))]
    on_split = evaluate("gpt", "--storage-root", str(root), *one_each)
    assert on_split["sequences"] == len(texts)
    assert predict_accuracy == pytest.approx(on_split["metrics"]["val/accuracy"], abs=1e-12)
    assert predict_accuracy >= 0.9
    for p in predicted:
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)

    # the exported folder evaluates and predicts exactly as the run
    folder_split = evaluate(str(export), *one_each)
    assert folder_split["metrics"] == pytest.approx(on_split["metrics"], rel=1e-6)
    from_export = json_lines("predict", str(export), "--text", "-", "--json", stdin=stdin)
    assert [p["label"] for p in from_export] == [p["label"] for p in predicted]
    for a, b in zip(from_export, predicted, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
    f1 = [r["val/f1_macro"] for r in evaluations]
    print(f"gpt2 val/accuracy {accuracy}, f1_macro {f1}, predict accuracy on {len(texts)} val texts {predict_accuracy}")


def test_bert_learns_the_classes_under_fsdp(labelled, tmp_path):
    run = train(
        labelled, tmp_path, "bert", "model=bert_tiny", "strategy=fsdp", "optim.lr=2e-3",
        "train.max_steps=100", "train.eval_every=50", "train.checkpoint_every=100",
    )  # fmt: skip
    evaluations = [r for r in rows(run) if "val/accuracy" in r]
    accuracy = [r["val/accuracy"] for r in evaluations]
    assert [r["step"] for r in evaluations] == [0, 50, 100] and accuracy[2] >= 0.9, accuracy
    predicted = json_lines("predict", "bert", "--storage-root", str(tmp_path), "--text", "piano song the", "--json")
    assert predicted[0]["label"] == "music"
    print(f"bert val/accuracy {accuracy}, f1_macro {[r['val/f1_macro'] for r in evaluations]}")


def test_classification_refuses_unlabelled_data_other_labels_and_predict_a_language_model_in_one_line(
    labelled, tmp_path
):
    data = tmp_path / "plain"
    splits = {}
    for split in ("train", "val"):
        writer = ShardWriter(str(data), split, seq_len=32, vocab_size=300, eos_id=0)
        writer.add(list(range(1, 200)))
        splits[split] = writer.close()
    write_manifest(
        str(data), {"kind": "pretrain", "seq_len": 32, "vocab_size": 300, "eos_id": 0, "dtype": "<u2", "splits": splits}
    )
    runs = tmp_path / "runs"
    result = kiln_refused("train", *CLASSIFY, f"data.path={data}", f"storage.root={runs}")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert f"task=classification trains on a label per sequence, but the dataset at {data} (kind=pretrain)" in message
    assert "kiln prepare kind=classification" in message
    assert not runs.exists() or not list(runs.iterdir())  # nothing registered

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_pipeline import tokenizer as bpe

    bpe.save(bpe.train_bpe(["a b c"] * 5, vocab_size=280), str(tmp_path / "tok"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "lm"
    )
    bpe.load(str(tmp_path / "tok")).save_pretrained(tmp_path / "lm")
    result = kiln_refused("predict", str(tmp_path / "lm"), "--text", "a b")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr.strip()
    assert "\n" not in message and "is a task=causal_lm model, not a classifier" in message

    # model.init_from a classifier of other classes (with the data's own tokenizer): refused before any worker
    from transformers import GPT2ForSequenceClassification

    shape = {"vocab_size": 320, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2, "eos_token_id": 0}
    two = GPT2Config(**shape, bos_token_id=0, pad_token_id=0, num_labels=2)
    two.id2label, two.label2id = {0: "spam", 1: "ham"}, {"spam": 0, "ham": 1}
    GPT2ForSequenceClassification(two).save_pretrained(tmp_path / "spam")
    bpe.load(str(labelled / "tokenizer")).save_pretrained(tmp_path / "spam")
    init = f"model.init_from={tmp_path / 'spam'}"
    result = kiln_refused("train", *CLASSIFY[:3], "tracker=none", f"data.path={labelled}", init, f"storage.root={runs}")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert f"{init} classifies into ['spam', 'ham'] but the data's label map is ['food', 'music', 'sports'," in message
