"""Fine-tuning examples: chat conversations with loss masks, and labelled texts for classification.

A chat row is either {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}, ...]}
with roles system, user and assistant. `encode_chat` renders it once with the tokenizer's own chat template
(transformers' `apply_chat_template`; Kiln's template, data_pipeline/tokenizer.py, only where the tokenizer has
none), so its tokens are exactly what `apply_chat_template` gives a model of that tokenizer, and masks what the
model learns: each assistant reply and the token that ends its turn.

The mask comes from the template's `{% generation %}` markers where it has them (transformers' assistant mask);
else from rendering each reply's prefixes and diffing: the reply is the text between the conversation before
it (with the generation prompt) and the conversation through it. Either way each row is checked: the reply's
text must start and end on token boundaries and be learned whole, and prefixes must render as prefixes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, cast

from data_pipeline.tokenizer import CHAT_SPECIAL_TOKENS, has_generation_markers, legacy_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
IGNORE = 0  # mask value: no loss on this token (labels become -100 when training)
LEARN = 1

# One record of a data file (a JSON object): its fields are checked here, so they are anything until then.
Row: TypeAlias = Mapping[str, object]


class ExampleError(ValueError):
    """A row that is not a valid example of its kind; the message says what is wrong."""


def chat_messages(row: Row) -> list[dict[str, str]]:
    """The conversation of a chat row, validated."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ExampleError("'messages' must be a non-empty list of {role, content}")
    elif "prompt" in row and "response" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise ExampleError("a chat row needs 'messages' or both 'prompt' and 'response'")
    checked = role_messages(messages, "messages")
    if not any(m["role"] == "assistant" for m in checked):
        raise ExampleError("the conversation has no assistant message to learn from")
    return checked


def role_messages(messages: list, name: str) -> list[dict[str, str]]:
    """messages as {role, content} strings, each checked (ExampleError naming `name[i]` and what is wrong)."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ExampleError(f"{name}[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ExampleError(f"{name}[{i}].content must be a string")
    # both strings, checked above
    return [{"role": cast(str, m["role"]), "content": cast(str, m["content"])} for m in messages]


@dataclass(frozen=True)
class ChatRow:
    """One conversation as stored: its token ids and a mask that is 1 only on what to learn."""

    ids: list[int]
    mask: list[int]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """The conversation as text in the tokenizer's chat template; ExampleError if the template raises on it."""
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))
    except Exception as exc:  # jinja's TemplateError, or the template's own raise_exception
        raise ExampleError(f"the tokenizer's chat template refuses this conversation: {one_line(exc)}") from None


def encode_chat(tokenizer: PreTrainedTokenizerBase, row: Row) -> ChatRow:
    """A chat row rendered once with the tokenizer's chat template, and its loss mask (checked)."""
    messages = chat_messages(row)
    if has_generation_markers(tokenizer.chat_template):
        encoded = marked_chat(tokenizer, messages)
    else:
        encoded = diffed_chat(tokenizer, messages)
    if LEARN not in encoded.mask:
        raise ExampleError("the chat template rendered no assistant tokens to learn from this conversation")
    return encoded


def marked_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> ChatRow:
    """Tokens and mask from a template with `{% generation %}` markers (transformers' assistant mask)."""
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as exc:
        raise ExampleError(f"the tokenizer's chat template refuses this conversation: {one_line(exc)}") from None
    return ChatRow(list(out["input_ids"]), [LEARN if m else IGNORE for m in out["assistant_masks"]])


def diffed_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> ChatRow:
    """Tokens of the whole rendered conversation, learning each reply's text span found by diffing prefixes."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = [reply_span(tokenizer, messages, i, full) for i, m in enumerate(messages) if m["role"] == "assistant"]
    # apply_chat_template tokenizes its text without the tokenizer's own specials: the template places them
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for start, end in encoded["offset_mapping"]:
        inside = [a <= start and end <= b for a, b in spans]
        crossing = [start < a < end or start < b < end for a, b in spans]
        if any(crossing):
            raise ExampleError(
                f"a token spans a reply's edge (characters {start}-{end} of the rendered conversation): the "
                "chat template joins a reply to its surroundings without a token boundary; give it "
                "{% generation %} markers"
            )
        mask.append(LEARN if any(inside) else IGNORE)
    return ChatRow(list(encoded["input_ids"]), mask)


def reply_span(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], i: int, full: str
) -> tuple[int, int]:
    """Characters [start, end) of full that are reply i and the token ending its turn."""
    prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
    through = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
    if not (through.startswith(prompt) and full.startswith(through)):
        raise ExampleError(
            f"the chat template does not render messages[{i}] after the conversation before it (its prefixes are "
            "not prefixes of the whole): Kiln cannot tell the reply's tokens; give the template {% generation %} "
            "markers"
        )
    return len(prompt), turn_end(through, len(prompt), special_texts(tokenizer))


def turn_end(text: str, start: int, specials: list[str]) -> int:
    """Where a reply's turn ends in text[start:]: after its end-of-turn special token, leaving out the whitespace
    some templates put between turns (ChatML's newline after <|im_end|>)."""
    stripped = text.rstrip()
    if len(stripped) > start and any(stripped.endswith(token) for token in specials):
        return len(stripped)
    return len(text)


def special_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The texts of the tokenizer's special tokens."""
    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return sorted({*added, *tokenizer.all_special_tokens}, key=len, reverse=True)


def reply_ends(row: ChatRow) -> set[int]:
    """The ids that end each learned run of the row (a reply's end-of-turn token, when the template has one)."""
    return {row.ids[i] for i in range(len(row.ids)) if row.mask[i] and (i + 1 == len(row.ids) or not row.mask[i + 1])}


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, cut to a readable length."""
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def classification_example(row: Row, text_field: str) -> tuple[str, str]:
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


PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the chat template ends a reply with (Llama 3's <|eot_id|>, ChatML's <|im_end|>, Kiln's
    EOS), read off a rendered probe conversation; [] for a tokenizer without a template or one that refuses it."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        ends = reply_ends(encode_chat(tokenizer, {"messages": PROBE}))
    except ExampleError:
        return []
    specials = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return sorted(ends & (specials | set(tokenizer.all_special_ids)))


def generation_stops(tokenizer: PreTrainedTokenizerBase, held: int | list[int] | None = None) -> list[int]:
    """Where a reply's generation stops: the tokenizer's EOS, its template's end-of-turn tokens and the ids a
    generation config already held; for Kiln's template from before complete folders, its role tokens too (a
    model of that template ends a reply by starting the next turn)."""
    stops = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer), *(held if isinstance(held, list) else [held])]
    if tokenizer.chat_template == legacy_chat_template():
        stops += [tokenizer.convert_tokens_to_ids(token) for token in CHAT_SPECIAL_TOKENS]
    return sorted({int(i) for i in stops if i is not None})
