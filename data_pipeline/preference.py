"""Preference pairs (`kiln prepare kind=preference`, for DPO): TRL 1.16's tokenization, cut and stored layout.

A row is TRL's explicit-prompt preference format: `prompt`, `chosen` and `rejected`, all three strings, or all
three message lists (the prompt's messages, then one assistant message each). Other fields are ignored (TRL would
pass `tools` and `chat_template_kwargs` to the template; Kiln does not).

Tokenized as TRL's `DPOTrainer._prepare_dataset` does, so a pair trains as it would under TRL:
- strings: each answer gets the EOS token's text unless it ends with it; the prompt and prompt + answer are
  tokenized with the tokenizer's specials (a Llama BOS);
- conversations: the prompt with the generation prompt, and the prompt + answer, through `apply_chat_template`;
- the prompt is the common prefix of the prompt's tokens and both prompt + answer sequences, and each answer is
  the rest of its sequence (with ChatML, the newline after `<|im_end|>` too).

Then the collator's cut (`fit_pair`): a sequence longer than seq_len keeps its start (the prompt kept, the answer
cut); a pair whose prompt alone fills seq_len is dropped, as TRL filters it; nothing is ever split across rows.

A stored example is two rows of seq_len tokens: prompt + chosen, then prompt + rejected, each padded with the pad
id (EOS if the tokenizer has none); its uint8 mask is 1 exactly on each answer's tokens (TRL's completion mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from data_pipeline.dataset import ShardWriter
from data_pipeline.examples import IGNORE, LEARN, ExampleError, Row, one_line, role_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FIELDS = ("prompt", "chosen", "rejected")
EXAMPLE_ROWS = 2  # a stored example: the chosen row, then the rejected row
OUTCOMES = ("stored", "truncated", "dropped", "identical")  # what `fit_pair` makes of a pair
Messages = list[dict[str, str]]
Sequences = tuple[list[int], list[int], list[int]]  # token ids of the prompt, prompt + chosen, prompt + rejected


class IdenticalAnswers(ExampleError):
    """A pair whose answers are the same: there is nothing to prefer, so the whole preparation stops on it."""

    def __init__(self, detail: str = ""):
        super().__init__(
            f"the chosen and rejected answers are identical{detail}: a pair must prefer one answer over another"
        )


@dataclass(frozen=True)
class PreferenceRow:
    """A validated row: the three fields as strings, or as message lists (conversational)."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages


@dataclass(frozen=True)
class PreferencePair:
    """One pair as TRL tokenizes it: both whole sequences (prompt + answer) and the shared prompt's length."""

    prompt_len: int
    chosen: list[int]
    rejected: list[int]
    # the prompt tokenized alone is not a prefix of prompt + answer (a template or a token merge differs); TRL warns
    prompt_mismatch: bool = False


@dataclass(frozen=True)
class FittedPair:
    """What `fit_pair` made of a pair: the pair to store (None if left out), and one of OUTCOMES."""

    pair: PreferencePair | None
    outcome: str


def preference_row(row: Row) -> PreferenceRow:
    """The pair of a record, validated (ExampleError naming what is wrong; IdenticalAnswers for equal answers)."""
    missing = [name for name in FIELDS if name not in row or row[name] is None]
    if missing:
        raise ExampleError(f"a preference row needs 'prompt', 'chosen' and 'rejected'; missing {', '.join(missing)}")
    prompt, chosen, rejected = (row[name] for name in FIELDS)
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        parsed = PreferenceRow(prompt, _text_answer("chosen", chosen), _text_answer("rejected", rejected))
    elif isinstance(prompt, list) and isinstance(chosen, list) and isinstance(rejected, list):
        parsed = PreferenceRow(
            _prompt_messages(prompt), _answer_message("chosen", chosen), _answer_message("rejected", rejected)
        )
    else:
        raise ExampleError(
            "'prompt', 'chosen' and 'rejected' must all be strings or all be message lists "
            f"(got {type(prompt).__name__}, {type(chosen).__name__}, {type(rejected).__name__})"
        )
    if parsed.chosen == parsed.rejected:
        raise IdenticalAnswers()
    return parsed


def _text_answer(name: str, answer: str) -> str:
    if not answer.strip():
        raise ExampleError(f"'{name}' is empty")
    return answer


def _prompt_messages(messages: list) -> Messages:
    if not messages:
        raise ExampleError("'prompt' is an empty message list")
    return role_messages(messages, "prompt")


def _answer_message(name: str, messages: list) -> Messages:
    # One assistant turn: the answer the pair prefers (or not) after the prompt's conversation.
    message = messages[0] if len(messages) == 1 else None
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise ExampleError(f"'{name}' must be exactly one message with role assistant")
    content = message.get("content")
    if not isinstance(content, str):
        raise ExampleError(f"{name}[0].content must be a string")
    if not content.strip():
        raise ExampleError(f"'{name}' is empty")
    return [{"role": "assistant", "content": content}]


def row_text(row: PreferenceRow) -> str:
    """The texts of a pair, one per line (what a record says, for messages and checks)."""
    parts = [row.prompt, row.chosen, row.rejected]
    return "\n".join(p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in parts)


def encode_preference(tokenizer: PreTrainedTokenizerBase, record: Row) -> PreferencePair:
    """A record tokenized exactly as TRL 1.16's `DPOTrainer._prepare_dataset` does (ExampleError if it cannot be;
    IdenticalAnswers if its answers tokenize the same)."""
    row = preference_row(record)
    prompt, chosen, rejected = row.prompt, row.chosen, row.rejected
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        prompt_ids, chosen_ids, rejected_ids = _text_ids(tokenizer, prompt, chosen, rejected)
    elif isinstance(prompt, list) and isinstance(chosen, list) and isinstance(rejected, list):
        prompt_ids, chosen_ids, rejected_ids = _conversation_ids(tokenizer, prompt, chosen, rejected)
    else:
        raise TypeError("preference_row returns three strings or three message lists")
    if chosen_ids == rejected_ids:  # e.g. "x" against "x</s>": TRL appends the EOS to the first
        raise IdenticalAnswers(" once tokenized")
    prompt_len = min(common_prefix(prompt_ids, chosen_ids), common_prefix(prompt_ids, rejected_ids))
    return PreferencePair(prompt_len, chosen_ids, rejected_ids, prompt_mismatch=prompt_len < len(prompt_ids))


def _text_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chosen: str, rejected: str) -> Sequences:
    eos = str(tokenizer.eos_token)
    # TRL adds the EOS as text, so a model learns to end its answer (the tokenizer maps it to the EOS id)
    chosen, rejected = (a if a.endswith(eos) else a + eos for a in (chosen, rejected))

    def ids(text: str) -> list[int]:
        return [int(i) for i in tokenizer(text=text)["input_ids"]]

    return ids(prompt), ids(prompt + chosen), ids(prompt + rejected)


def _conversation_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Messages, chosen: Messages, rejected: Messages
) -> Sequences:
    if not getattr(tokenizer, "chat_template", None):
        raise ExampleError(
            "a conversational pair needs a chat template, and the tokenizer has none: give tokenizer= a folder with "
            "the model's template, or write the pair as strings"
        )
    try:
        return (
            _template_ids(tokenizer, prompt, add_generation_prompt=True),
            _template_ids(tokenizer, prompt + chosen),
            _template_ids(tokenizer, prompt + rejected),
        )
    except Exception as exc:  # jinja's TemplateError, or the template's own raise_exception
        raise ExampleError(f"the tokenizer's chat template refuses this conversation: {one_line(exc)}") from None


def _template_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool = False
) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return [int(i) for i in out["input_ids"]]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share (TRL's `common_prefix_length`)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fit_pair(pair: PreferencePair, seq_len: int, overflow: str = "truncate") -> FittedPair:
    """The pair cut to seq_len as TRL's collator cuts it (keep_start), or why it is left out: its prompt fills
    seq_len or overflow=drop would cut it (dropped), or its answers are the same once cut (identical)."""
    if pair.prompt_len >= seq_len:  # TRL filters these: no answer token would be left to learn
        return FittedPair(None, "dropped")
    cut = len(pair.chosen) > seq_len or len(pair.rejected) > seq_len
    if not cut:
        return FittedPair(pair, "stored")
    if overflow == "drop":
        return FittedPair(None, "dropped")
    chosen, rejected = pair.chosen[:seq_len], pair.rejected[:seq_len]
    if chosen == rejected:  # both answers start alike past seq_len: the pair would give no gradient
        return FittedPair(None, "identical")
    return FittedPair(PreferencePair(pair.prompt_len, chosen, rejected, pair.prompt_mismatch), "truncated")


def stored_example(pair: PreferencePair, seq_len: int, pad_id: int) -> tuple[list[int], list[int]]:
    """A fitted pair as stored: tokens and mask of the chosen row then the rejected row, each seq_len long and
    padded with pad_id; the mask is 1 on each answer's tokens only."""
    tokens: list[int] = []
    mask: list[int] = []
    for sequence in (pair.chosen, pair.rejected):
        padding = seq_len - len(sequence)
        tokens += [*sequence, *[pad_id] * padding]
        mask += [IGNORE] * pair.prompt_len + [LEARN] * (len(sequence) - pair.prompt_len) + [IGNORE] * padding
    return tokens, mask


class PreferenceWriter:
    """kind=preference: one pair per stored example (2 * seq_len tokens and their mask), so a pair's two rows are
    always read, shuffled and split across ranks together; counts what was cut or left out."""

    def __init__(self, dataset_url: str, split: str, *, seq_len: int, vocab_size: int, pad_id: int, overflow: str):
        self.rows = ShardWriter(
            dataset_url, split, seq_len=EXAMPLE_ROWS * seq_len, vocab_size=vocab_size, eos_id=pad_id, with_mask=True
        )
        self.seq_len, self.pad_id, self.overflow = seq_len, pad_id, overflow
        self.counts = dict.fromkeys(("truncated", "dropped", "identical", "prompt_mismatch"), 0)
        self.pair_tokens = 0  # tokens of the stored rows that are not padding

    def add(self, pair: PreferencePair) -> bool:
        """Store one pair (cut if longer than seq_len); False if it was left out."""
        fitted = fit_pair(pair, self.seq_len, self.overflow)
        if fitted.outcome != "stored":
            self.counts[fitted.outcome] += 1
        if fitted.pair is None:
            return False
        kept = fitted.pair
        if kept.chosen[: kept.prompt_len] != kept.rejected[: kept.prompt_len]:
            raise ValueError("a preference pair's rows must share the prompt's tokens")  # by construction
        self.counts["prompt_mismatch"] += kept.prompt_mismatch
        self.pair_tokens += len(kept.chosen) + len(kept.rejected)
        self.rows.add(*stored_example(kept, self.seq_len, self.pad_id))
        return True

    def close(self) -> dict:
        """Write the pairs and return this split's manifest entry (sequences count pairs), with the counts."""
        entry = self.rows.close()
        stored = entry["tokens"]
        entry.update(
            self.counts, pair_tokens=self.pair_tokens, fill=round(self.pair_tokens / stored, 4) if stored else 0.0
        )
        return entry
