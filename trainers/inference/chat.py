"""A conversation with a chat (SFT) model: prompts in the training data's chat template, history kept within
the model's context, replies streamed token by token through transformers' `generate` and TextStreamer.

`kiln chat` (orchestrator/cli/inference.py) reads the turns and writes the replies; everything here works
on a loaded model. Prompts are rendered with the tokenizer's own chat template (apply_chat_template), as
`kiln prepare kind=chat` rendered the training conversations, so a prompt tokenizes exactly as training data did,
and a reply stops at the template's end-of-turn tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trainers.inference.loaded_model import (
    InferenceError,
    LoadedModel,
    Sampling,
    check_speaks_chat,
    prompt_ids,
    shorter,
)

Message = dict[str, str]


def fit_history(
    messages: list[Message], count: Callable[[list[Message]], int], budget: int
) -> tuple[list[Message], int]:
    """The newest part of the conversation whose prompt takes at most `budget` tokens, and how many exchanges
    were dropped to get there.

    An exchange is a user message and the replies after it; the oldest goes first. The last user message
    is never dropped: if it alone does not fit, the caller says so.
    """
    dropped = 0
    while count(messages) > budget:
        later_users = [i for i in range(1, len(messages)) if messages[i]["role"] == "user"]
        if not later_users:
            break
        messages = messages[later_users[0] :]
        dropped += 1
    return messages, dropped


class _ReplyStreamer:
    """TextStreamer that hands each finished piece of the reply to `write` instead of printing it.

    The template ends a reply with a newline before EOS: trailing newlines are held back until more text
    follows, so the reply written is exactly the reply kept in the history.
    """

    def __init__(self, tokenizer: Any, write: Callable[[str], None]) -> None:
        from transformers import TextStreamer

        outer = self

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                outer.piece(text, stream_end)

        self.streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write
        self.held = ""

    def piece(self, text: str, stream_end: bool) -> None:
        text = self.held + text
        body = text.rstrip("\n")
        self.held = "" if stream_end else text[len(body) :]
        if body:
            self.write(body)


class ChatSession:
    """One conversation: its history, and a reply to each user message."""

    def __init__(self, loaded: LoadedModel, sampling: Sampling, note: Callable[[str], None] = lambda _: None):
        can_generate = getattr(loaded.model, "can_generate", None)
        if can_generate is None or not can_generate():
            raise InferenceError(f"{loaded.name} is not a causal LM ({type(loaded.model).__name__}): it cannot chat")
        check_speaks_chat(loaded)
        self.loaded = loaded
        self.note = note
        context = loaded.context
        if context is not None and sampling.max_new_tokens >= context:
            raise InferenceError(
                f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt: {loaded.name} "
                f"takes {context} tokens in all"
            )
        self.budget = None if context is None else context - sampling.max_new_tokens
        self.context = context
        self.config = sampling.generation_config(loaded.stop_ids, loaded.pad_id)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # once: the same turns give the same conversation
        elif not sampling.greedy:
            torch.seed()
        self.history: list[Message] = []

    def reset(self) -> None:
        """Forget the conversation."""
        self.history = []

    def reply(self, text: str, write: Callable[[str], None]) -> str | None:
        """The model's reply to `text`, written piece by piece as it is generated; None if it cannot fit."""
        tokenizer = self.loaded.tokenizer
        messages = [*self.history, {"role": "user", "content": text}]
        new_tokens = self.config.max_new_tokens
        if self.budget is not None and self.context is not None:
            alone = len(prompt_ids(tokenizer, messages[-1:]))
            if alone >= self.context:
                self.note(
                    f"that message takes {alone} tokens in the chat template, and the model takes {self.context} in "
                    "all: shorten it"
                )
                return None
            if alone > self.budget:  # the message alone, and fewer tokens for the reply than asked
                messages, new_tokens = messages[-1:], self.context - alone
                self.note(
                    f"that message takes {alone} tokens in the chat template: the reply gets the {new_tokens} the "
                    f"model's context ({self.context}) has left, and the history is set aside; shorten it or lower "
                    "--max-new-tokens for more"
                )
            messages, dropped = fit_history(messages, lambda m: len(prompt_ids(tokenizer, m)), self.budget)
            if dropped:
                self.note(
                    f"dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''} of the history to fit "
                    f"the model's context ({self.context} tokens, {self.budget} for the prompt)"
                )
        ids = torch.tensor([prompt_ids(tokenizer, messages)], dtype=torch.long)
        streamer = _ReplyStreamer(tokenizer, write)
        with torch.no_grad():
            output = self.loaded.model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=self.config
                if new_tokens == self.config.max_new_tokens
                else shorter(self.config, new_tokens),
                streamer=streamer.streamer,
            )
        answer = tokenizer.decode(output[0, ids.shape[1] :].tolist(), skip_special_tokens=True).rstrip("\n")
        self.history = [*messages, {"role": "assistant", "content": answer}]
        return answer
