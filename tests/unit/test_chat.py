"""`kiln chat`'s parts without a trained model: prompts in the tokenizer's own template that continue exactly
where the training rows' replies start, the history cut to the context, and a session on a tiny random GPT-2
(streamed pieces, /reset, the truncation said)."""

from __future__ import annotations

import pytest

from data_pipeline.examples import encode_chat
from data_pipeline.tokenizer import kiln_chat_template, train_bpe, train_kiln_tokenizer
from tests.tokenizer_folders import FAMILIES, build_tokenizer
from trainers.inference.chat import ChatSession, fit_history
from trainers.inference.loaded_model import InferenceError, LoadedModel, Sampling, prompt_ids

TEXTS = ["what is 3 plus 4? 3 plus 4 is 7. hello there, how are you? fine thanks."] * 20
TWO_TURNS = [
    {"role": "user", "content": "what is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "and 1 plus 1?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    """Kiln's own tokenizer, as `kiln prepare` trains it (chat role tokens and template included)."""
    return train_kiln_tokenizer(TEXTS, 300)


def tiny_model(tokenizer, n_positions: int = 64):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2)
    return LoadedModel(GPT2LMHeadModel(config).eval(), tokenizer, "tiny")


@pytest.mark.parametrize("family", ["kiln", *(f.name for f in FAMILIES)])
def test_a_prompt_tokenizes_as_the_training_conversation_did(family, tokenizer):
    """The reply the model learned starts right where `kiln chat`'s prompt ends, in every family's template."""
    if family != "kiln":
        tokenizer = build_tokenizer(next(f for f in FAMILIES if f.name == family))
    reply = {"role": "assistant", "content": "1 plus 1 is 2."}
    trained = encode_chat(tokenizer, {"messages": [*TWO_TURNS, reply]})
    prompt = prompt_ids(tokenizer, TWO_TURNS)
    assert trained.ids[: len(prompt)] == prompt
    assert trained.mask[len(prompt)] == 1 and not any(trained.mask[: len(prompt)][-3:])


def test_kilns_template_puts_role_tokens_and_an_eos_after_each_reply(tokenizer):
    assert tokenizer.chat_template == kiln_chat_template()
    text = tokenizer.decode(prompt_ids(tokenizer, TWO_TURNS))
    first = "<|user|>\nwhat is 3 plus 4?\n<|assistant|>\n3 plus 4 is 7." + tokenizer.eos_token + "\n"
    assert text == first + "<|user|>\nand 1 plus 1?\n<|assistant|>\n"
    role_ids = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert all(i in prompt_ids(tokenizer, TWO_TURNS) for i in role_ids)  # real special tokens, not 6-7 pieces


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


def test_a_session_streams_keeps_history_resets_and_says_when_it_cuts(tokenizer):
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
    assert session.reply("what is 3 plus 4? " * 20, pieces.append) is None  # alone over the whole context
    assert "shorten it" in notes[-1] and session.history == []
    near = "what"  # over the prompt's budget, under the context: a shorter reply, no history
    while len(prompt_ids(tokenizer, [{"role": "user", "content": near}])) < 58:
        near += " what"
    assert session.reply(near, pieces.append) is not None
    assert "the reply gets the" in notes[-1] and [m["role"] for m in session.history] == ["user", "assistant"]


def test_a_session_stops_at_the_templates_end_of_turn_token():
    """A Llama 3 model's reply ends at <|eot_id|> (its EOS here) and a ChatML one's at <|im_end|>."""
    for family in FAMILIES:
        loaded = tiny_model(build_tokenizer(family))
        assert loaded.tokenizer.convert_tokens_to_ids(family.end_of_turn) in loaded.stop_ids


def test_a_model_without_a_chat_template_cannot_chat(tokenizer):
    from data_pipeline.tokenizer import kiln_tokenizer

    plain = kiln_tokenizer(train_bpe(TEXTS, 300))  # no role tokens: no template
    assert plain.chat_template is None
    with pytest.raises(InferenceError, match="has no chat template"):
        ChatSession(tiny_model(plain), Sampling())
    with pytest.raises(InferenceError, match="leaves no room"):
        ChatSession(tiny_model(tokenizer), Sampling(max_new_tokens=64))


def test_the_quickstart_corpus_tokenizer_can_chat_so_its_exports_can_be_fine_tuned_to(cache_dir):
    """The built-in corpus's tokenizer has the chat role tokens (special) and Kiln's template: a quickstart run's
    export, fine-tuned with task=sft on data prepared with it, can then `kiln chat`."""
    from data_pipeline.config import DataConfig
    from data_pipeline.dataset import Dataset
    from data_pipeline.stdlib_corpus import prepare_stdlib
    from data_pipeline.tokenizer import load

    url = prepare_stdlib(DataConfig(seq_len=64, vocab_size=512, max_files=60), str(cache_dir), log=lambda _: None)
    tokenizer = load(Dataset(url).tokenizer_url)
    assert tokenizer.chat_template == kiln_chat_template() and tokenizer.eos_token_id == Dataset(url).eos_id
    ids = prompt_ids(tokenizer, TWO_TURNS)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|user|>")) == 2  # role markers are single special tokens
