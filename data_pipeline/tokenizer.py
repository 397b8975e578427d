"""Byte-level BPE tokenizers, trained locally with `tokenizers` (never fetched from a hub)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline import storage

EOS_TOKEN = "<|endoftext|>"
# What a masked LM (task=mlm) reads in place of a hidden token. Added after training, so it takes the last id
# and no other token's id depends on it.
MASK_TOKEN = "<|mask|>"
TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE tokenizer of vocab_size tokens: an end-of-text token (and any other
    specials) first, the mask token last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # room for the mask token
        special_tokens=[EOS_TOKEN, *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([MASK_TOKEN])
    return tokenizer


@dataclass(frozen=True)
class Vocabulary:
    """The ids a task draws on: how many tokens there are, which are special, and the mask token (if any)."""

    size: int
    specials: tuple[int, ...]
    mask_id: int | None


def vocabulary(tokenizer: Tokenizer) -> Vocabulary:
    """A tokenizer's size, special token ids and mask token id."""
    specials = tuple(sorted(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special))
    return Vocabulary(tokenizer.get_vocab_size(), specials, tokenizer.token_to_id(MASK_TOKEN))


def save(tokenizer: Tokenizer, folder_url: str) -> str:
    """Write tokenizer.json into folder_url and return its sha256."""
    text = tokenizer.to_str()
    storage.write_atomic(storage.join(folder_url, TOKENIZER_FILE), text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load(folder_url: str) -> Tokenizer:
    """Read tokenizer.json from a folder (local or object storage)."""
    return Tokenizer.from_str(storage.read_text(storage.join(folder_url, TOKENIZER_FILE)))
