"""Byte-level BPE tokenizers, trained locally with `tokenizers` (never fetched from a hub)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline import storage

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE tokenizer with an end-of-text token (and any other specials)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save(tokenizer: Tokenizer, folder_url: str) -> str:
    """Write tokenizer.json into folder_url and return its sha256."""
    text = tokenizer.to_str()
    storage.write_atomic(storage.join(folder_url, TOKENIZER_FILE), text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load(folder_url: str) -> Tokenizer:
    """Read tokenizer.json from a folder (local or object storage)."""
    return Tokenizer.from_str(storage.read_text(storage.join(folder_url, TOKENIZER_FILE)))
