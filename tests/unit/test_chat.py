"""`kiln chat`'s parts without a trained model: the one chat template (training data, prompts, the exported
Jinja copy), prompts that carry the history, the history cut to the context, and a session on a tiny
random GPT-2 (streamed pieces, /reset, the truncation said)."""

from __future__ import annotations

import pytest

from data_pipeline.examples import CHAT_SPECIAL_TOKENS, encode_chat, render_chat
from data_pipeline.tokenizer import EOS_TOKEN, save, train_bpe
from trainers.chat import ChatSession, fit_history
from trainers.inference import InferenceError, LoadedModel, Sampling, prompt_ids, speaks_kiln_chat

TEXTS = ["what is 3 plus 4? 3 plus 4 is 7. hello there, how are you? fine thanks."] * 20
TWO_TURNS = [
    {"role": "user", "content": "what is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "and 1 plus 1?"},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(the raw `tokenizers` BPE that prepare uses, the run's transformers tokenizer made from it)."""
    from trainers.export import hf_tokenizer

    raw = train_bpe(TEXTS, 300, CHAT_SPECIAL_TOKENS)
    folder = tmp_path_factory.mktemp("tok")
    save(raw, str(folder))
    return raw, hf_tokenizer(str(folder))


def tiny_model(tokenizer, n_positions: int = 64):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer.get_vocab()), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2)
    return LoadedModel(GPT2LMHeadModel(config).eval(), tokenizer, "tiny")


def test_the_exported_jinja_template_renders_exactly_what_render_chat_does(tokenizers):
    _, tokenizer = tokenizers
    assert speaks_kiln_chat(tokenizer)
    complete = [*TWO_TURNS, {"role": "assistant", "content": "2"}]
    for messages, generation in ((TWO_TURNS, True), (complete, False)):
        expected = "".join(text for text, _ in render_chat(messages, add_generation_prompt=generation))
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert rendered == expected
    assert expected.endswith(f"\n{EOS_TOKEN}") and "<|assistant|>\n2\n" in expected


def test_a_prompt_tokenizes_as_the_training_conversation_did(tokenizers):
    raw, tokenizer = tokenizers
    trained, mask = encode_chat(raw, {"messages": [*TWO_TURNS, {"role": "assistant", "content": "1 plus 1 is 2."}]})
    prompt = prompt_ids(tokenizer, TWO_TURNS)
    assert trained[: len(prompt)] == prompt  # the reply the model learned starts right where the prompt ends
    assert mask[len(prompt)] == 1 and not any(mask[: len(prompt)][-3:])


def test_the_second_turns_prompt_holds_the_first_turn(tokenizers):
    _, tokenizer = tokenizers
    text = tokenizer.decode(prompt_ids(tokenizer, TWO_TURNS))
    first, second = "<|user|>\nwhat is 3 plus 4?\n<|assistant|>\n3 plus 4 is 7.\n", "<|user|>\nand 1 plus 1?\n"
    assert text == first + second + "<|assistant|>\n"


def test_history_drops_whole_oldest_exchanges_until_it_fits():
    def message(role, n):
        return {"role": role, "content": "x" * n}

    def count(messages):
        return sum(len(m["content"]) for m in messages)

    history = [message("user", 3), message("assistant", 3), message("user", 2), message("assistant", 2)]
    history.append(message("user", 1))
    assert fit_history(history, count, 11) == (history, 0)
    assert fit_history(history, count, 10) == (history[2:], 1)
    assert fit_history(history, count, 4) == (history[4:], 2)
    assert fit_history(history, count, 0) == (history[4:], 2)  # the last message stays; the caller says so


def test_a_session_streams_keeps_history_resets_and_says_when_it_cuts(tokenizers):
    _, tokenizer = tokenizers
    notes: list[str] = []
    session = ChatSession(tiny_model(tokenizer), Sampling(max_new_tokens=8), note=notes.append)
    pieces: list[str] = []
    answer = session.reply("what is 3 plus 4?", pieces.append)
    assert answer is not None and "".join(pieces) == answer
    assert [m["role"] for m in session.history] == ["user", "assistant"] and session.history[1]["content"] == answer
    assert not notes
    for _ in range(6):  # a 64-token model with 8 for the reply: the history soon has to be cut
        session.reply("hello there, how are you?", lambda _: None)
    assert any("dropped the oldest" in n and "64 tokens" in n for n in notes), notes
    assert len(prompt_ids(tokenizer, session.history[:-1])) <= 56
    session.reset()
    assert session.history == []
    assert session.reply("what is 3 plus 4? " * 20, pieces.append) is None  # alone over the budget
    assert "shorten it" in notes[-1] and session.history == []


def test_a_model_without_the_chat_template_cannot_chat(tokenizers, tmp_path):
    from trainers.export import hf_tokenizer

    plain = train_bpe(TEXTS, 300)
    save(plain, str(tmp_path))
    with pytest.raises(InferenceError, match="no Kiln chat template"):
        ChatSession(tiny_model(hf_tokenizer(str(tmp_path))), Sampling())
    _, tokenizer = tokenizers
    with pytest.raises(InferenceError, match="leaves no room"):
        ChatSession(tiny_model(tokenizer), Sampling(max_new_tokens=64))
