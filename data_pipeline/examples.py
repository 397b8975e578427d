"""Fine-tuning examples: chat conversations with loss masks, and labelled texts for classification.

Chat template (one conversation; the model learns only each assistant reply with its closing newline, and
the final EOS):

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}\\n ... <|endoftext|>

`render_chat` is its one definition: `kiln prepare kind=chat` encodes its pieces for training and `kiln chat`
for prompting (ending in `<|assistant|>\\n` instead of EOS). `chat_template_jinja` says the same in Jinja,
for the tokenizer `kiln export` writes (other tools call apply_chat_template); a unit test compares the two.

A row is either {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}, ...]}
with roles system, user and assistant.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.tokenizer import EOS_TOKEN

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
CHAT_SPECIAL_TOKENS = list(ROLE_TOKENS.values())
IGNORE = 0  # mask value: no loss on this token (labels become -100 when training)
LEARN = 1


class ExampleError(ValueError):
    """A row that is not a valid example of its kind; the message says what is wrong."""


def chat_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of a chat row, validated."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ExampleError("'messages' must be a non-empty list of {role, content}")
    elif "prompt" in row and "response" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise ExampleError("a chat row needs 'messages' or both 'prompt' and 'response'")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLE_TOKENS:
            raise ExampleError(f"messages[{i}].role must be one of {', '.join(ROLE_TOKENS)}")
        if not isinstance(message.get("content"), str):
            raise ExampleError(f"messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ExampleError("the conversation has no assistant message to learn from")
    return messages


def render_chat(messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """A conversation in the chat template, as (text, learn) pieces in order.

    Each piece is tokenized on its own (so a prompt tokenizes exactly as the training data did); learn is
    True on the assistant's text, the newline closing it, and the final EOS. A complete conversation ends with EOS; with
    add_generation_prompt it ends with the assistant's role line instead, for the model to continue.
    """
    pieces: list[tuple[str, bool]] = []
    for message in messages:
        pieces.append((f"{ROLE_TOKENS[message['role']]}\n", False))
        pieces.append((message["content"], message["role"] == "assistant"))
        # The newline closing a reply is learned too: a model that never learned to write it cannot end its turn.
        pieces.append(("\n", message["role"] == "assistant"))
    if add_generation_prompt:
        pieces.append((f"{ROLE_TOKENS['assistant']}\n", False))
    else:
        pieces.append((EOS_TOKEN, True))  # learn to end the conversation
    return pieces


def encode_chat(tokenizer, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the chat template, and a mask that is 1 only on what to learn."""
    ids: list[int] = []
    mask: list[int] = []
    for text, learn in render_chat(chat_messages(row)):
        piece = [tokenizer.token_to_id(EOS_TOKEN)] if text == EOS_TOKEN else tokenizer.encode(text).ids
        ids.extend(piece)
        mask.extend([LEARN if learn else IGNORE] * len(piece))
    return ids, mask


def chat_template_jinja() -> str:
    """render_chat as a Hugging Face `chat_template` (Jinja), for tools that call apply_chat_template.

    The same text as render_chat joined; tests/unit/test_chat.py renders both and compares.
    """
    roles = "{" + ", ".join(f"'{role}': '{token}'" for role, token in ROLE_TOKENS.items()) + "}"
    return (
        f"{{% set roles = {roles} %}}"
        "{% for message in messages %}{{ roles[message['role']] }}\n{{ message['content'] }}\n{% endfor %}"
        f"{{% if add_generation_prompt %}}{ROLE_TOKENS['assistant']}\n{{% else %}}{EOS_TOKEN}{{% endif %}}"
    )


def classification_example(row: dict[str, Any], text_field: str) -> tuple[str, str]:
    """(text, label) of a classification row; the label is kept as a string until the label map is made."""
    text, label = row.get(text_field), row.get("label")
    if not isinstance(text, str) or not text.strip():
        raise ExampleError(f"field '{text_field}' must be a non-empty string")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise ExampleError("field 'label' is missing")
    return text, str(label)


def label_map(labels: set[str]) -> dict[str, int]:
    """Label -> class id: numeric labels in numeric order, others sorted; stable across runs."""
    try:
        ordered = sorted(labels, key=lambda v: float(v))
    except ValueError:
        ordered = sorted(labels)
    return {label: i for i, label in enumerate(ordered)}
