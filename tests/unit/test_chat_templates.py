"""Chat rows in each family's own template: Llama 3, ChatML (Qwen2), Mistral [INST] and Kiln's, per row.

The stored tokens are exactly `apply_chat_template`'s, the BOS appears once where the template has one, the
mask covers the replies and the token ending each turn and nothing else, a template that raises names the row,
and a conversation longer than a row is cut or dropped and counted."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import ChatRowWriter, Dataset, write_manifest
from data_pipeline.examples import ExampleError, encode_chat, end_of_turn_ids
from tests.tokenizer_folders import FAMILIES, LLAMA3, MISTRAL, build_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "what is one plus one?"}, {"role": "assistant", "content": "two."}],
    [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hello, how are you today?"},
        {"role": "user", "content": "repeat: cloud moon fish"},
        {"role": "assistant", "content": "cloud moon fish"},
    ],
]
SYSTEM = {"role": "system", "content": "Be brief."}


def tokenizers():
    """(name, tokenizer, the text that ends a reply's turn) for every family and Kiln's own."""
    kiln = bpe.train_kiln_tokenizer(["what is one plus one? two. hello there, cloud moon fish"] * 20, 300)
    yield "kiln", kiln, kiln.eos_token
    for family in FAMILIES:
        yield family.name, build_tokenizer(family), family.end_of_turn


@pytest.mark.parametrize(
    ("name", "tokenizer", "end"), list(tokenizers()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_each_row_is_the_templates_tokens_with_the_mask_on_the_replies_and_their_end_of_turn(name, tokenizer, end):
    for messages in CONVERSATIONS:
        row = encode_chat(tokenizer, {"messages": messages})
        assert row.ids == list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
        if tokenizer.bos_token_id is not None:  # the template's one BOS, not one per piece
            assert row.ids.count(tokenizer.bos_token_id) == 1 and row.ids[0] == tokenizer.bos_token_id
        runs, current = [], []
        for token, learn in zip(row.ids, row.mask, strict=True):
            if learn:
                current.append(token)
            elif current:
                runs.append(tokenizer.decode(current))
                current = []
        runs += [tokenizer.decode(current)] if current else []
        assert runs == [m["content"] + end for m in messages if m["role"] == "assistant"], name
    assert tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)) == [end]


def test_a_system_message_is_rendered_where_the_template_takes_one_and_refused_where_it_raises():
    row = encode_chat(build_tokenizer(LLAMA3), {"messages": [SYSTEM, *CONVERSATIONS[0]]})
    assert sum(row.mask) > 0
    with pytest.raises(ExampleError, match="chat template refuses this conversation: Conversation roles must"):
        encode_chat(build_tokenizer(MISTRAL), {"messages": [SYSTEM, *CONVERSATIONS[0]]})


def test_a_folder_kiln_wrote_before_complete_folders_still_loads_as_the_kiln_tokenizer_it_was(tmp_path):
    raw = bpe.train_bpe(["a b c d e f"] * 10, 300, bpe.CHAT_SPECIAL_TOKENS)
    (tmp_path / bpe.TOKENIZER_FILE).write_text(raw.to_str())  # what older Kiln wrote: tokenizer.json alone
    tokenizer = bpe.load(str(tmp_path))
    assert tokenizer.eos_token == bpe.EOS_TOKEN and tokenizer.mask_token == bpe.MASK_TOKEN
    assert tokenizer.chat_template == bpe.legacy_chat_template()  # its models chat as they were trained
    assert len(tokenizer) == raw.get_vocab_size()


def test_a_longer_conversation_is_cut_or_dropped_and_counted_and_rows_are_padded_unlearned(tmp_path):
    pad = 9
    for overflow, kept in (("truncate", 2), ("drop", 1)):
        writer = ChatRowWriter(
            str(tmp_path / overflow), "train", seq_len=4, vocab_size=300, pad_id=pad, overflow=overflow
        )
        assert writer.add([1, 2], [0, 1])
        assert writer.add([1, 2, 3, 4, 5, 6], [0, 1, 1, 1, 1, 1]) == (overflow == "truncate")
        assert not writer.add([1, 2, 3, 4, 5], [0, 0, 0, 0, 1])  # its reply starts past the row: nothing to learn
        entry = writer.close()
        assert (entry["sequences"], entry["truncated"], entry["dropped"]) == (kept, kept - 1, 3 - kept)
        write_manifest(
            str(tmp_path / overflow),
            {"seq_len": 4, "vocab_size": 300, "eos_id": 0, "dtype": "<u2", "splits": {"train": entry}},
        )
        (shard,) = Dataset(str(tmp_path / overflow)).shards("train")
        tokens = np.fromfile(shard.url, dtype="<u2").reshape(-1, 4)
        mask = np.fromfile(str(shard.mask_url), dtype=np.uint8).reshape(-1, 4)
        assert tokens[0].tolist() == [1, 2, pad, pad] and mask[0].tolist() == [0, 1, 0, 0]
        if overflow == "truncate":
            assert tokens[1].tolist() == [1, 2, 3, 4] and mask[1].tolist() == [0, 1, 1, 1]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": [], "rejected": []}, "prompt[0].role"),
    ],
)
def test_a_bad_message_is_named_by_its_field_and_place_in_chat_and_preference_rows(row, expected):
    from data_pipeline.examples import chat_messages
    from data_pipeline.preference import preference_row

    with pytest.raises(ExampleError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        (preference_row if "chosen" in row else chat_messages)(row)
