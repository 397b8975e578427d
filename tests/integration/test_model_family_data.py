"""`kiln prepare` with tokenizers that are not Kiln's: a Llama 3 folder (BOS from its post-processor,
<|eot_id|> ending each turn), a Qwen2 ChatML folder and a Mistral [INST] folder, built here.

Chat rows are exactly what `apply_chat_template` gives, one conversation a row (so none attends to another),
the loss mask on each reply and its end-of-turn token only; plain text takes the folder's own BOS and EOS;
what Kiln cannot honour is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import Dataset
from tests.helpers import kiln, prepare_rows
from tests.tokenizer_folders import LLAMA3, MISTRAL, QWEN2, save_tokenizer

pytestmark = pytest.mark.slow
NO_CLUSTER = {"RAY_ADDRESS": "127.0.0.1:9"}  # a stale cluster address: prepare starts its own local Ray


def conversations(n: int) -> list[dict]:
    """Arithmetic chats, some with a system message, some two exchanges long; one with a reply far longer than a
    row (cut: its start is learned), one whose prompt alone is (dropped: nothing of it could be learned)."""
    rows: list[dict] = []
    for i in range(n):
        a, b = i % 17, i % 5
        messages = [
            {"role": "user", "content": f"what is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a + b}."},
        ]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Be brief."}, *messages]
        if i % 4 == 0:
            messages += [{"role": "user", "content": "repeat: cloud"}, {"role": "assistant", "content": "cloud"}]
        rows.append({"messages": messages})
    rows.append({"messages": [{"role": "user", "content": "repeat"}, {"role": "assistant", "content": "cloud " * 200}]})
    rows.append({"messages": [{"role": "user", "content": "hello " * 200}, {"role": "assistant", "content": "hi"}]})
    return rows


def stored_rows(dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of every sequence of a split."""
    tokens, masks = [], []
    for shard in dataset.shards(split):
        tokens.append(np.frombuffer(Path(shard.url).read_bytes(), dataset.dtype).reshape(-1, dataset.seq_len))
        assert shard.mask_url is not None
        masks.append(np.frombuffer(Path(shard.mask_url).read_bytes(), np.uint8).reshape(-1, dataset.seq_len))
    return np.concatenate(tokens), np.concatenate(masks)


def test_llama3_chat_rows_are_its_template_one_conversation_a_row_learning_replies_and_eot(tmp_path):
    folder = save_tokenizer(LLAMA3, tmp_path / "llama")
    rows = conversations(60)
    out = prepare_rows(tmp_path, rows, "kind=chat", f"tokenizer={folder}", "seq_len=128", "val_fraction=0.2")
    dataset = Dataset(str(out))
    tokenizer = bpe.load(dataset.tokenizer_url)
    eot, bos, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|begin_of_text|>", LLAMA3.pad))
    assert (dataset.eos_id, dataset.manifest["bos_id"], dataset.manifest["pad_id"]) == (eot, bos, pad)
    chat = dataset.manifest["chat"]
    assert chat["end_of_turn_ids"] == [eot] and chat["mask"] == "prefix diff"
    assert chat["truncated"] == 1 and chat["dropped"] == 1  # the long reply cut at 128 tokens; the long prompt
    expected = {}
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
        expected[tuple(ids[:128])] = row["messages"]
    seen = 0
    for split in ("train", "val"):
        tokens, masks = stored_rows(dataset, split)
        for ids, mask in zip(tokens.tolist(), masks.tolist(), strict=True):
            length = len(ids) - next((i for i, t in enumerate(reversed(ids)) if t != pad), len(ids))
            conversation = tuple(ids[:length])
            assert conversation in expected  # exactly apply_chat_template's tokens, one conversation a row
            assert ids.count(bos) == 1 and ids[0] == bos  # its BOS once, at its start: no second conversation
            assert not any(mask[length:])  # padding is never learned
            learned = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
            replies = [m["content"] + "<|eot_id|>" for m in expected[conversation] if m["role"] == "assistant"]
            if length < 128:  # whole: the learned tokens are the replies and their <|eot_id|>, nothing else
                assert learned == "".join(replies)
            else:  # the cut one: its reply's start, up to the row's end
                assert "cloud cloud" in learned and not learned.endswith("<|eot_id|>")
            seen += 1
    assert seen == len(rows) - 1


def test_qwen2_text_is_packed_with_its_own_eos_and_mistral_refuses_a_system_message(tmp_path):
    """Plain text needs no `<|endoftext|>` by name; a template that raises on a row is named, one line, exit 2."""
    qwen = save_tokenizer(QWEN2, tmp_path / "qwen")
    (tmp_path / "text").mkdir()
    texts = [{"text": f"document {i}: the quick brown fox jumps over the lazy dog"} for i in range(200)]
    out = prepare_rows(tmp_path / "text", texts, f"tokenizer={qwen}", "seq_len=32", "val_fraction=0.1")
    dataset = Dataset(str(out))
    assert dataset.eos_id == bpe.load(str(qwen)).convert_tokens_to_ids("<|im_end|>")
    tokens = np.frombuffer(Path(dataset.shards("train")[0].url).read_bytes(), dataset.dtype)
    assert (tokens == dataset.eos_id).sum() >= 150 * 0.9 * 32 // 40  # every document ends with it

    mistral = save_tokenizer(MISTRAL, tmp_path / "mistral")
    rows = tmp_path / "system.jsonl"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rows.write_text(json.dumps({"messages": [*system, {"role": "assistant", "content": "hello"}]}) + "\n")
    args = [f"input={rows}", f"output={tmp_path / 'out'}", "kind=chat", f"tokenizer={mistral}", "on_bad_record=fail"]
    result = kiln("prepare", *args, env=NO_CLUSTER)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "chat template refuses this conversation: Conversation roles must alternate" in line
