"""`kiln prepare`: raw files in, packed shards out (by Ray Data or in-process, the same), bad records named, results
cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import Dataset
from data_pipeline.stream import TokenStream
from tests.helpers import TINY_MODEL, kiln, kiln_here, rows, torchrun
from tests.tokenizer_folders import LLAMA3, save_tokenizer

pytestmark = pytest.mark.slow
WORDS = ["alpha", "beta", "gamma", "delta", "kiln", "ray", "token", "shard"]

# A 4-step run of a tiny model on 32-token sequences: enough to prove a dataset trains.
SMALL_RUN = [
    "data.seq_len=32",
    *TINY_MODEL,
    "train.max_steps=4",
    "train.eval_every=4",
    "train.eval_batches=1",
    "tracker=none",
]


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for i in range(n)]


def make_inputs(folder: Path) -> list[str]:
    """Good documents in JSONL, Parquet and text, plus three bad records and one empty one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    first, second = documents(120, 1), documents(80, 2)
    lines = (
        [json.dumps({"text": t}) for t in first[:60]]
        + ["{broken json"]
        + [json.dumps({"title": "no text"}), json.dumps({"text": ""})]
        + [json.dumps({"text": t}) for t in first[60:]]
    )
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": second}), folder / "b.parquet")
    (folder / "c.txt").write_text("a plain text document about kilns")
    (folder / "d.txt").write_bytes(b"caf\xe9 au lait")
    return first + second + ["a plain text document about kilns"]


def prepared_documents(out: Path) -> dict[str, list[str]]:
    """Decode each split's shards back into its documents (the last partial one may be cut)."""
    dataset = Dataset(str(out))
    tokenizer = bpe.load(dataset.tokenizer_url)
    docs = {}
    for split in ("train", "val"):
        ids = np.concatenate(
            [np.frombuffer(Path(s.url).read_bytes(), dtype=dataset.dtype) for s in dataset.shards(split)]
        )
        pieces, current = [], []
        for token in ids.tolist():
            if token == dataset.eos_id:
                pieces.append(tokenizer.decode(current))
                current = []
            else:
                current.append(token)
        docs[split] = pieces
    return docs


def test_prepare_packs_every_good_document_in_order_and_reports_bad_ones(tmp_path):
    expected = make_inputs(tmp_path / "raw")
    out = tmp_path / "prepared"
    args = ["prepare", f"input={tmp_path}/raw/*", f"output={out}", "seq_len=32", "vocab_size=400", "val_fraction=0.2"]
    # Ray Data, as a large input gets it. A cluster address left in the environment (a dead one here) is not
    # where a local prepare runs.
    result = kiln(*args, "engine=ray", env={"RAY_ADDRESS": "127.0.0.1:9"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read and tokenized by Ray Data" in result.stdout
    assert "3 bad records, 1 empty documents dropped" in result.stdout
    assert f"{tmp_path}/raw/a.jsonl:61: malformed JSON" in result.stdout
    assert f"{tmp_path}/raw/a.jsonl:62: field 'text' is missing" in result.stdout
    assert f"{tmp_path}/raw/d.txt:1: not UTF-8" in result.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seq_len"] == 32 and manifest["dtype"] == "<u2"
    assert manifest["summary"]["documents"] == len(expected) and manifest["summary"]["bad_records"] == 3
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            data = (out / shard["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert len(data) == shard["tokens"] * 2 and shard["tokens"] == shard["sequences"] * 32
    docs = prepared_documents(out)
    from data_pipeline.prepare import split_of

    for split in ("train", "val"):
        wanted = [t for t in expected if split_of(t, 0.2) == split]
        assert docs[split] == wanted[: len(docs[split])]  # input order; only the cut tail is missing
        assert len(docs[split]) >= len(wanted) - 2
    assert 0 < len(docs["val"]) < len(docs["train"])

    again = kiln(*args)
    assert again.returncode == 0 and "reusing" in again.stdout  # the engine is not part of what is prepared
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # A small input is read in this process (engine=auto): byte for byte the dataset Ray Data made.
    local = kiln(*[a.replace(str(out), str(tmp_path / "local")) for a in args])
    assert local.returncode == 0 and "read and tokenized in this process (engine=auto)" in local.stdout
    made_here = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert made_here["splits"] == manifest["splits"] and made_here["tokenizer"] == manifest["tokenizer"]
    assert {**made_here["summary"], "wall_s": 0} == {**manifest["summary"], "wall_s": 0}

    with open(tmp_path / "raw" / "a.jsonl", "a") as handle:
        handle.write(json.dumps({"text": "one more document"}) + "\n")
    changed = kiln(*args)
    assert changed.returncode == 0 and "preparing it again" in changed.stdout
    assert json.loads((out / "manifest.json").read_text())["summary"]["documents"] == len(expected) + 1


def test_on_bad_record_fail_stops_at_file_and_line(tmp_path):
    make_inputs(tmp_path / "raw")
    result = kiln(
        "prepare",
        f"input={tmp_path}/raw/a.jsonl",
        f"output={tmp_path}/out",
        "seq_len=32",
        "vocab_size=400",
        "on_bad_record=fail",
    )
    assert result.returncode == 2
    assert f"{tmp_path}/raw/a.jsonl:61: malformed JSON" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_on_s3_then_train_streaming_from_s3(s3, tmp_path, cache_dir):
    import s3fs

    fs = s3fs.S3FileSystem()
    local_raw = tmp_path / "raw"
    make_inputs(local_raw)
    fs.put(str(local_raw / "a.jsonl"), f"{s3}/raw/a.jsonl")
    fs.put(str(local_raw / "b.parquet"), f"{s3}/raw/b.parquet")
    out = f"s3://{s3}/prepared/v1"
    # Ray Data's workers read S3 themselves (engine=ray), as a large input on S3 is read.
    result = kiln(
        "prepare",
        f"input=s3://{s3}/raw/*",
        f"output={out}",
        "seq_len=32",
        "vocab_size=400",
        "val_fraction=0.2",
        "engine=ray",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert fs.exists(f"{s3}/prepared/v1/manifest.json")

    local = tmp_path / "copy"
    fs.get(f"{s3}/prepared/v1/", str(local), recursive=True)
    remote_stream = TokenStream(Dataset(out), "train", rank=1, world_size=2, micro_batch=4, seed=3)
    local_stream = TokenStream(Dataset(str(local)), "train", rank=1, world_size=2, micro_batch=4, seed=3)
    for _ in range(5):
        assert np.array_equal(next(remote_stream).tokens, next(local_stream).tokens)

    torchrun(
        "data=prepared",
        f"data.path={out}",
        *SMALL_RUN,
        "run.id=s3data",
        f"storage.root={tmp_path / 'runs'}",
    )
    losses = [r["train/loss"] for r in rows(tmp_path / "runs" / "s3data") if "train/loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))

    missing = kiln("prepare", "input=s3://no-such-bucket-kiln/raw/*.jsonl", f"output={tmp_path}/x")
    assert missing.returncode == 2 and "s3://no-such-bucket-kiln/raw/*.jsonl" in missing.stderr


def test_a_second_dataset_with_the_first_ones_tokenizer_trains_as_a_mixture(tmp_path, cache_dir):
    for name, seed in (("web", 1), ("code", 2)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(150, seed)))
    first = kiln(
        "prepare",
        f"input={tmp_path}/web.jsonl",
        f"output={tmp_path}/web",
        "seq_len=32",
        "vocab_size=400",
        "val_fraction=0.2",
    )
    assert first.returncode == 0, first.stderr[-2000:]
    second = kiln(
        "prepare",
        f"input={tmp_path}/code.jsonl",
        f"output={tmp_path}/code",
        "seq_len=32",
        f"tokenizer={tmp_path}/web/tokenizer",
        "val_fraction=0.2",
    )
    assert second.returncode == 0, second.stderr[-2000:]
    web, code = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("web", "code"))
    assert web["tokenizer"]["sha256"] == code["tokenizer"]["sha256"] and code["tokenizer"]["trained"] is False

    mixture = f"data.mixture=[{{path: {tmp_path}/web, weight: 3}}, {{path: {tmp_path}/code, weight: 1}}]"
    torchrun(
        "data=mixture",
        mixture,
        *SMALL_RUN,
        "run.id=mix",
        f"storage.root={tmp_path / 'runs'}",
    )
    losses = [r["train/loss"] for r in rows(tmp_path / "runs" / "mix") if "train/loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    saved = (tmp_path / "runs" / "mix" / "config.yaml").read_text()
    assert f"{tmp_path}/code" in saved and "weight: 1.0" in saved


def test_chat_rows_are_templated_and_the_stored_loss_mask_covers_exactly_the_assistant_replies(tmp_path):
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"it is {2 * i}."} for i in range(120)]
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
            ]
        }
    )
    rows.append({"messages": [{"role": "user", "content": "nobody answers"}]})
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = kiln(
        "prepare",
        f"input={tmp_path}/chat.jsonl",
        f"output={tmp_path}/out",
        "kind=chat",
        "seq_len=64",
        "vocab_size=400",
        "val_fraction=0.1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{tmp_path}/chat.jsonl:122: the conversation has no assistant message" in result.stdout
    from data_pipeline.prepare import split_of

    train_rows = [i for i, row in enumerate(rows[:120]) if split_of(json.dumps(row), 0.1) == "train"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kind"] == "chat" and manifest["summary"]["documents"] == 121
    tokenizer = bpe.load(str(tmp_path / "out" / "tokenizer"))
    assert manifest["chat"]["template"] == "kiln" and manifest["chat"]["mask"] == "generation markers"
    ids = np.concatenate(
        [np.fromfile(tmp_path / "out" / s["path"], dtype="<u2") for s in manifest["splits"]["train"]["shards"]]
    ).reshape(-1, 64)
    mask = np.concatenate(
        [
            np.fromfile(tmp_path / "out" / s["mask"]["path"], dtype=np.uint8)
            for s in manifest["splits"]["train"]["shards"]
        ]
    ).reshape(-1, 64)
    assert ids.shape == mask.shape and set(np.unique(mask)) == {0, 1}
    # One conversation a row, in order: the masked-in tokens are its reply and the EOS that ends the turn (so a
    # model learns to end it); the rest is its templated prompt, then padding.
    replies = [f"it is {2 * i}." for i in train_rows]
    if split_of(json.dumps(rows[120]), 0.1) == "train":
        replies.append("hello there")
    assert len(ids) == len(replies)
    for row, learn, reply, i in zip(ids.tolist(), mask.tolist(), replies, [*train_rows, 120], strict=False):
        learned = [t for t, m in zip(row, learn, strict=True) if m]
        assert tokenizer.decode(learned) == reply + tokenizer.eos_token
        shown = tokenizer.decode([t for t, m in zip(row, learn, strict=True) if not m])
        assert ("hi" if i == 120 else f"what is {i} plus {i}?") in shown and "it is" not in shown
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids[0].tolist()  # a real special token


def test_classification_rows_get_a_label_map_and_one_example_per_sequence(tmp_path):
    import csv

    with open(tmp_path / "reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(100):
            writer.writerow(
                [f"review {i}: " + ("great fun" if i % 2 else "boring and slow"), "pos" if i % 2 else "neg"]
            )
        writer.writerow(["no label here", ""])
    result = kiln(
        "prepare",
        f"input={tmp_path}/reviews.csv",
        f"output={tmp_path}/out",
        "kind=classification",
        "seq_len=16",
        "vocab_size=400",
        "val_fraction=0.1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{tmp_path}/reviews.csv:102: field 'label' is missing" in result.stdout
    assert json.loads((tmp_path / "out" / "label_map.json").read_text()) == {"neg": 0, "pos": 1}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (shard,) = manifest["splits"]["train"]["shards"]
    tokens = np.fromfile(tmp_path / "out" / shard["path"], dtype="<u2").reshape(-1, 16)
    labels = np.fromfile(tmp_path / "out" / shard["labels"]["path"], dtype="<i4")
    assert len(tokens) == len(labels) == manifest["splits"]["train"]["documents"]
    assert len(tokens) + manifest["splits"]["val"]["documents"] == 100
    tokenizer = bpe.load(str(tmp_path / "out" / "tokenizer"))
    for row, label in zip(tokens[:6], labels[:6], strict=False):
        text = tokenizer.decode([t for t in row.tolist() if t != manifest["eos_id"]])
        number = int(text.split(":")[0].split()[1])
        assert label == number % 2 and ("great" in text) == bool(label)


def test_preference_pairs_are_stored_two_rows_an_example_with_their_counts_and_identical_answers_refused(tmp_path):
    folder = save_tokenizer(LLAMA3, tmp_path / "llama3")
    pairs = [{"prompt": f"what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": " no idea."} for i in range(40)]
    pairs += [
        {
            "prompt": [{"role": "user", "content": f"repeat: cloud {i}"}],
            "chosen": [{"role": "assistant", "content": f"cloud {i}"}],
            "rejected": [{"role": "assistant", "content": "moon"}],
            "source": "extra fields are ignored",
        }
        for i in range(20)
    ]
    pairs += [
        {"prompt": "count", "chosen": " cloud" * 80, "rejected": " one"},  # the chosen answer is cut at seq_len
        {"prompt": "hello " * 80, "chosen": " hi", "rejected": " bye"},  # the prompt alone fills seq_len: dropped
        {"prompt": "p", "chosen": " a"},  # no rejected answer: a bad record
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    args = ["prepare", f"input={source}", "kind=preference", f"tokenizer={folder}", "seq_len=48", "val_fraction=0.2"]
    result = kiln(*args, f"output={tmp_path}/out")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "61 documents" in result.stdout and "1 bad records" in result.stdout
    assert (
        "one pair per example, its chosen then its rejected row of seq_len=48: 1 with an answer cut there, "
        "1 dropped (prompt fills seq_len), 0 identical once cut, 0 with a prompt that tokenizes differently alone"
    ) in " ".join(result.stdout.split())
    assert f"skipped: {source}:63: a preference row needs 'prompt', 'chosen' and 'rejected'; missing rejected" in (
        " ".join(result.stdout.split())
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kind"] == "preference" and manifest["example_rows"] == 2 and manifest["seq_len"] == 48
    counts = {k: manifest["preference"][k] for k in ("truncated", "dropped", "identical", "prompt_mismatch")}
    assert counts == {"truncated": 1, "dropped": 1, "identical": 0, "prompt_mismatch": 0}
    assert manifest["preference"]["pad_id"] == manifest["pad_id"] != manifest["eos_id"]  # Llama 3's own pad
    assert manifest["preference"]["template"] == "tokenizer"
    splits = manifest["splits"]
    assert splits["train"]["sequences"] + splits["val"]["sequences"] == 61  # one stored example a pair
    for split in splits.values():
        for shard in split["shards"]:
            assert shard["tokens"] == shard["sequences"] * 2 * 48
            assert (tmp_path / "out" / shard["mask"]["path"]).stat().st_size == shard["tokens"]

    pairs.insert(5, {"prompt": "p", "chosen": " same", "rejected": " same"})
    source.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    refused = kiln_here(*args, f"output={tmp_path}/refused")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert (
        f"{source}:6: the chosen and rejected answers are identical: a pair must prefer one answer over another"
    ) in refused.stderr
