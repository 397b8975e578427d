"""`kiln prepare kind=preference`: pairs tokenized, cut and stored exactly as TRL 1.16 makes them for DPO, bad
records named, identical answers refused, and pairs kept whole by the data stream at any world size.

TRL is the reference: its own `DPOTrainer._prepare_dataset` (called unbound) and `DataCollatorForPreference`
give the rows and completion masks every stored pair must equal, with the Llama 3, ChatML (Qwen2) and Mistral
tokenizer folders of tests/tokenizer_folders.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from data_pipeline.batch import Batch
from data_pipeline.dataset import Dataset
from data_pipeline.examples import ExampleError
from data_pipeline.preference import (
    IdenticalAnswers,
    PreferencePair,
    encode_preference,
    fit_pair,
    preference_row,
    stored_example,
)
from data_pipeline.prepare import PrepareConfig, PrepareError, PrepareSummary, prepare, split_of
from data_pipeline.stream import TokenStream
from tests.tokenizer_folders import FAMILIES, LLAMA3, MISTRAL, build_tokenizer, save_tokenizer

SEQ_LEN = 64
VAL_FRACTION = 0.3
USER, ASSISTANT = "user", "assistant"


def said(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# --- what a record must be ------------------------------------------------------------------------------------

GOOD = {"prompt": "what is one plus one?", "chosen": " two.", "rejected": " three."}
BAD_RECORDS = [
    ({"chosen": "a", "rejected": "b"}, "missing prompt"),
    ({"prompt": "p", "rejected": "b"}, "missing chosen"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "missing rejected"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": " \n"}, "'rejected' is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "all be strings or all be message lists"),
    ({"prompt": "p", "chosen": [said(ASSISTANT, "a")], "rejected": [said(ASSISTANT, "b")]}, "all be strings"),
    ({"prompt": [], "chosen": [said(ASSISTANT, "a")], "rejected": [said(ASSISTANT, "b")]}, "empty message list"),
    ({"prompt": [said("tool", "x")], "chosen": [said(ASSISTANT, "a")], "rejected": [said(ASSISTANT, "b")]}, "role"),
    ({"prompt": [{"role": USER}], "chosen": [said(ASSISTANT, "a")], "rejected": [said(ASSISTANT, "b")]}, "content"),
    ({"prompt": [said(USER, "q")], "chosen": [said(USER, "a")], "rejected": [said(ASSISTANT, "b")]}, "exactly one"),
    (
        {"prompt": [said(USER, "q")], "chosen": [said(ASSISTANT, "a")] * 2, "rejected": [said(ASSISTANT, "b")]},
        "'chosen' must be exactly one message with role assistant",
    ),
    ({"prompt": [said(USER, "q")], "chosen": [said(ASSISTANT, " ")], "rejected": [said(ASSISTANT, "b")]}, "empty"),
]


@pytest.mark.parametrize(("row", "message"), BAD_RECORDS)
def test_each_bad_record_is_an_example_error_saying_what_is_wrong(row, message):
    with pytest.raises(ExampleError, match=message) as raised:
        preference_row(row)
    assert not isinstance(raised.value, IdenticalAnswers)  # a bad record: on_bad_record applies


def test_extra_fields_are_ignored():
    tokenizer = build_tokenizer(LLAMA3)
    extra = {**GOOD, "id": 7, "score_chosen": 9.5, "tools": [{"name": "calc"}], "messages": "not used"}
    assert encode_preference(tokenizer, extra) == encode_preference(tokenizer, GOOD)


def test_identical_answers_are_refused_before_and_once_tokenized():
    with pytest.raises(IdenticalAnswers, match="the chosen and rejected answers are identical: a pair must prefer"):
        preference_row({**GOOD, "rejected": GOOD["chosen"]})
    tokenizer = build_tokenizer(LLAMA3)
    with_eos = {**GOOD, "rejected": GOOD["chosen"] + tokenizer.eos_token}  # TRL appends the EOS to the other
    with pytest.raises(IdenticalAnswers, match="identical once tokenized"):
        encode_preference(tokenizer, with_eos)


def test_conversational_pairs_need_a_template_and_one_the_template_refuses_is_a_bad_record():
    tokenizer = build_tokenizer(LLAMA3)
    tokenizer.chat_template = None
    assert encode_preference(tokenizer, GOOD).prompt_len > 0  # strings need no template
    conversation = {"prompt": [said(USER, "q")], "chosen": [said(ASSISTANT, "a")], "rejected": [said(ASSISTANT, "b")]}
    with pytest.raises(ExampleError, match="needs a chat template, and the tokenizer has none"):
        encode_preference(tokenizer, conversation)
    with_system = {**conversation, "prompt": [said("system", "be brief"), said(USER, "q")]}
    with pytest.raises(ExampleError, match="chat template refuses this conversation: Conversation roles must"):
        encode_preference(build_tokenizer(MISTRAL), with_system)


def test_fit_pair_cuts_as_trl_drops_a_prompt_that_fills_seq_len_and_counts_answers_identical_once_cut():
    pair = PreferencePair(3, [1, 2, 3, 4, 5, 6], [1, 2, 3, 7])
    assert fit_pair(pair, 8).outcome == "stored"
    cut = fit_pair(pair, 5)
    assert cut.outcome == "truncated" and cut.pair == PreferencePair(3, [1, 2, 3, 4, 5], [1, 2, 3, 7])
    assert fit_pair(pair, 5, overflow="drop") == fit_pair(pair, 3) == type(cut)(None, "dropped")
    same_start = PreferencePair(2, [1, 2, 3, 4, 5], [1, 2, 3, 4, 9])
    assert fit_pair(same_start, 4).outcome == "identical"
    tokens, mask = stored_example(cut.pair, 6, pad_id=0)
    assert tokens == [1, 2, 3, 4, 5, 0, 1, 2, 3, 7, 0, 0]
    assert mask == [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0]


def test_tokenizer_train_is_refused_for_preference_in_one_line():
    with pytest.raises(PrepareError, match="kind=preference needs the tokenizer of the model DPO fine-tunes") as err:
        PrepareConfig(input="x.jsonl", output="out", kind="preference")
    assert "\n" not in str(err.value)


# --- `prepare` itself, in this process -------------------------------------------------------------------------


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepared(tmp_path: Path, folder: Path, rows: list, **settings) -> tuple[Path, PrepareSummary]:
    """rows prepared with the tokenizer folder (kind=preference); returns the output folder and the summary."""
    source = write_rows(tmp_path / "pairs.jsonl", rows)
    cfg = PrepareConfig(
        input=str(source),
        output=str(tmp_path / "out"),
        kind="preference",
        tokenizer=str(folder),
        seq_len=SEQ_LEN,
        val_fraction=VAL_FRACTION,
        **settings,
    )
    return tmp_path / "out", prepare(cfg, log=lambda _: None)


def string_pairs(n: int) -> list[dict]:
    return [
        {"prompt": f"what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": f" {2 * i + 1}."} for i in range(n)
    ]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return save_tokenizer(LLAMA3, tmp_path_factory.mktemp("llama3"))


def test_bad_records_are_counted_and_named_or_stop_prepare_with_on_bad_record_fail(tmp_path, llama_folder):
    rows = [*string_pairs(30), {"prompt": "p", "chosen": "a"}, {"prompt": "p", "chosen": "", "rejected": "b"}]
    # answers that differ only past seq_len: the same once cut, so left out and counted, not refused
    rows.append({"prompt": "count", "chosen": " cloud" * 80 + " one", "rejected": " cloud" * 80 + " two"})
    out, summary = prepared(tmp_path, llama_folder, rows)
    source = tmp_path / "pairs.jsonl"
    assert summary.bad_records == 2 and summary.documents == 30
    assert summary.identical == 1 and summary.truncated == summary.dropped == 0
    assert json.loads((out / "manifest.json").read_text())["preference"]["identical"] == 1
    assert summary.bad_examples == [
        f"{source}:31: a preference row needs 'prompt', 'chosen' and 'rejected'; missing rejected",
        f"{source}:32: 'chosen' is empty",
    ]
    with pytest.raises(PrepareError, match=rf"bad record: {source}:31: a preference row needs .*missing rejected"):
        prepared(tmp_path, llama_folder, rows, on_bad_record="fail")


@pytest.mark.parametrize("on_bad_record", ["skip", "fail"])
def test_a_pair_with_identical_answers_stops_prepare_naming_its_file_and_line(tmp_path, llama_folder, on_bad_record):
    rows = [*string_pairs(12), {"prompt": "p", "chosen": "same", "rejected": "same"}, *string_pairs(3)]
    with pytest.raises(PrepareError) as err:
        prepared(tmp_path, llama_folder, rows, on_bad_record=on_bad_record)
    assert str(err.value) == (
        f"{tmp_path / 'pairs.jsonl'}:13: the chosen and rejected answers are identical: a pair must prefer one answer "
        "over another"
    )
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- parity with TRL 1.16 ------------------------------------------------------------------------------------------


def parity_rows(family_name: str) -> list[dict]:
    """String and conversational pairs: plain ones, an answer that already ends with the EOS text, extra fields, a
    system message (not for Mistral, whose template refuses one), an answer longer than a row (cut) and a prompt
    that fills a row (dropped)."""
    rows: list[dict] = []
    for i in range(14):
        rows.append({"id": len(rows), "prompt": f"what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": " no."})
        prompt = [said(USER, f"repeat: cloud {i}")]
        if i % 3 == 0 and family_name != MISTRAL.name:
            prompt = [said("system", "Be brief."), *prompt]
        rows.append(
            {
                "id": len(rows),
                "prompt": prompt,
                "chosen": [said(ASSISTANT, f"cloud {i}")],
                "rejected": [said(ASSISTANT, "moon fish")],
                "score": i,
            }
        )
    rows += [
        {"id": len(rows), "prompt": "say hi", "chosen": " hi<EOS>", "rejected": " go away."},
        {"id": len(rows) + 1, "prompt": "count", "chosen": " cloud" * 90, "rejected": " one two"},
        {"id": len(rows) + 2, "prompt": "hello " * 90, "chosen": " hi", "rejected": " bye"},
        {
            "id": len(rows) + 3,
            "prompt": [said(USER, "fish")],
            "chosen": [said(ASSISTANT, "fish " * 90)],
            "rejected": [said(ASSISTANT, "moon")],
        },
        {
            "id": len(rows) + 4,
            "prompt": [said(USER, "moon " * 90)],
            "chosen": [said(ASSISTANT, "a")],
            "rejected": [said(ASSISTANT, "b")],
        },
    ]
    return rows


@pytest.fixture(scope="module")
def trl():
    """TRL 1.16's preference tokenization and collator (imported once: it takes seconds)."""
    from datasets import Dataset as HFDataset
    from datasets import disable_progress_bars
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    disable_progress_bars()
    return SimpleNamespace(Dataset=HFDataset, Collator=DataCollatorForPreference, Trainer=DPOTrainer)


def trl_examples(trl, tokenizer, rows: list[dict]) -> dict[int, tuple[list[int], list[int]]]:
    """id -> (tokens, mask) of each pair TRL keeps: its chosen row then its rejected row, each padded to SEQ_LEN
    with the pad id (EOS without one) and mask 0, from `_prepare_dataset` and the collator (max_length=SEQ_LEN)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = trl.Collator(pad_token_id=pad, max_length=SEQ_LEN)
    args = SimpleNamespace(dataset_num_proc=None, max_length=SEQ_LEN, truncation_mode="keep_start")
    out = {}
    for conversational in (False, True):  # TRL takes a dataset's format from its first row: one call each
        chosen = [r for r in rows if isinstance(r["prompt"], list) == conversational]
        data = trl.Dataset.from_list([{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in chosen])
        kept = trl.Trainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), data, tokenizer, args, "train")
        for example in kept:
            batch = collator([example])
            tokens, mask = [], []
            for ids, attention, completion in zip(
                batch["input_ids"].tolist(),
                batch["attention_mask"].tolist(),
                batch["completion_mask"].tolist(),
                strict=True,
            ):
                length = sum(attention)  # padding aside: each row padded to SEQ_LEN as Kiln stores it
                tokens += ids[:length] + [pad] * (SEQ_LEN - length)
                mask += completion[:length] + [0] * (SEQ_LEN - length)
            out[example["id"]] = (tokens, mask)
    return out


def stored_examples(dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of every stored example of a split, one row of 2 * seq_len each."""
    width = dataset.example_tokens
    tokens = [np.frombuffer(Path(s.url).read_bytes(), dataset.dtype).reshape(-1, width) for s in dataset.shards(split)]
    masks = [
        np.frombuffer(Path(str(s.mask_url)).read_bytes(), np.uint8).reshape(-1, width) for s in dataset.shards(split)
    ]
    return np.concatenate(tokens), np.concatenate(masks)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_stored_pairs_are_trls_rows_and_completion_masks_for_each_family(tmp_path, trl, family):
    folder = save_tokenizer(family, tmp_path / family.name)
    tokenizer = build_tokenizer(family)
    rows = parity_rows(family.name)
    for row in rows:  # the answer that already ends with the EOS text: TRL adds no second one
        for answer in ("chosen", "rejected"):
            if isinstance(row[answer], str):
                row[answer] = row[answer].replace("<EOS>", tokenizer.eos_token)
    out, summary = prepared(tmp_path, folder, rows)
    expected = trl_examples(trl, tokenizer, rows)
    assert summary.bad_records == 0 and summary.identical == 0
    assert summary.truncated == 2 and summary.dropped == 2  # an answer cut, a prompt filling a row: each format
    assert len(expected) == len(rows) - 2 == summary.documents  # TRL drops the same two
    dataset = Dataset(str(out))
    assert dataset.example_rows == 2 and dataset.seq_len == SEQ_LEN and dataset.kind == "preference"
    section = dataset.manifest["preference"]
    assert (section["truncated"], section["dropped"], section["identical"]) == (2, 2, 0)
    for split in ("train", "val"):
        tokens, masks = stored_examples(dataset, split)
        ids = [r["id"] for r in rows if r["id"] in expected and split_of(json.dumps(r), VAL_FRACTION) == split]
        assert len(ids) == len(tokens) > 0
        for row_id, stored, mask in zip(ids, tokens.tolist(), masks.tolist(), strict=True):
            assert (stored, mask) == expected[row_id], f"{family.name} row {row_id}"


# --- the stream: pairs are its unit ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, llama_folder) -> Dataset:
    """A prepared preference dataset, its train split in several shards (so pairs are read across shard edges)."""
    import data_pipeline.dataset as ds

    tmp = tmp_path_factory.mktemp("pairs")
    saved, ds.SHARD_TOKENS = ds.SHARD_TOKENS, 5 * 2 * SEQ_LEN
    try:
        out, _ = prepared(tmp, llama_folder, string_pairs(40))
    finally:
        ds.SHARD_TOKENS = saved
    dataset = Dataset(str(out))
    assert len(dataset.shards("train")) > 2
    return dataset


def test_an_old_manifest_without_example_rows_has_one_row_per_example(tmp_path):
    from tests.helpers import numbered_dataset

    dataset = numbered_dataset(str(tmp_path), range(3))
    assert dataset.example_rows == 1 and dataset.example_tokens == dataset.seq_len


def consumed(streams: list[TokenStream], steps: int, stored: tuple[np.ndarray, np.ndarray]) -> list[int]:
    """The indices the streams' ranks read in steps steps, each batch row checked to be its whole stored pair."""
    tokens, masks = stored
    order = []
    for _ in range(steps):
        for stream in streams:
            batch = next(stream)
            assert batch.indices is not None and batch.loss_mask is not None
            assert batch.tokens.shape == batch.loss_mask.shape == (stream.micro_batch, 2 * SEQ_LEN)
            for row, mask, index in zip(batch.tokens, batch.loss_mask, batch.indices.tolist(), strict=True):
                assert (row == tokens[index]).all() and (mask == masks[index]).all()
                chosen, rejected = row[:SEQ_LEN], row[SEQ_LEN:]
                prompt = int(np.argmax(mask[:SEQ_LEN]))  # where the chosen answer starts
                assert prompt > 0 and (chosen[:prompt] == rejected[:prompt]).all()  # one pair's two rows
            order += batch.indices.tolist()
    return order


def test_the_stream_yields_whole_pairs_and_a_cursor_saved_at_world_2_continues_at_world_1(pairs):
    stored = stored_examples(pairs, "train")
    pairs_in_train = len(stored[0])

    def streams(world: int, state: dict | None = None) -> list[TokenStream]:
        made = [TokenStream(pairs, "train", rank=r, world_size=world, micro_batch=2, seed=11) for r in range(world)]
        for stream in made:
            if state:
                stream.load_state_dict(state)
        return made

    assert streams(1)[0].num_sequences == pairs_in_train  # the cursor counts pairs
    two = streams(2)
    before = consumed(two, 3, stored)
    state = two[0].state_dict()
    assert state["position"] == 12 and state["num_sequences"] == pairs_in_train
    after = consumed(streams(1, state), pairs_in_train, stored)
    reference = consumed(streams(1), 6 + pairs_in_train, stored)
    assert before + after == reference  # nothing skipped, nothing repeated
    assert sorted(reference[:pairs_in_train]) == list(range(pairs_in_train))  # each pair once an epoch


def test_batch_map_maps_the_indices():
    batch = Batch(np.zeros((2, 4)), positions=np.arange(2), indices=np.array([5, 9]))
    mapped = batch.map(lambda a: a * 2)
    assert mapped.indices is not None and mapped.indices.tolist() == [10, 18]
