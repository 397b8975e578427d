"""Tokenizers: one kind, a transformers tokenizer folder, read with local files only (never from a hub).

A folder holds `tokenizer.json` and `tokenizer_config.json` (its bos/eos/pad and, for chat, its chat template),
as `save_pretrained` writes it. A model's own folder is used as it is: its files are copied unchanged, and its
special tokens come from its configuration, never from a name Kiln assumes. The one tokenizer Kiln makes itself
is `train_bpe`'s byte-level BPE, saved as a complete folder by `kiln_tokenizer` + `save`.

Folders written by Kiln before tokenizer folders were complete hold `tokenizer.json` alone; `load` reads them as
the Kiln tokenizer they are (`legacy_kiln_tokenizer`), so every older dataset and run still loads.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline import storage

if TYPE_CHECKING:  # transformers is imported where a tokenizer is made, not with this module
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# The tokens of the tokenizer Kiln trains: nowhere else does Kiln spell them.
EOS_TOKEN = "<|endoftext|>"
# What a masked LM (task=mlm) reads in place of a hidden token. Added after training, so it takes the last id
# and no other token's id depends on it.
MASK_TOKEN = "<|mask|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
CHAT_SPECIAL_TOKENS = list(ROLE_TOKENS.values())

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# What a tokenizer folder may hold (transformers' names); copied unchanged from a model's folder.
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    CONFIG_FILE,
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TokenizerError(ValueError):
    """A tokenizer folder Kiln cannot use as it is; the message names the folder and the fix."""


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


def kiln_chat_template() -> str:
    """Kiln's chat template (Jinja), for a tokenizer that has none: role markers are special tokens, each reply
    ends with EOS, and `{% generation %}` marks what a model learns (each reply and its EOS)."""
    roles = "{" + ", ".join(f"'{role}': '{token}'" for role, token in ROLE_TOKENS.items()) + "}"
    return (
        f"{{% set roles = {roles} %}}"
        "{% for message in messages %}{{ roles[message['role']] + '\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{ROLE_TOKENS['assistant']}\n' }}}}{{% endif %}}"
    )


def legacy_chat_template() -> str:
    """The chat template of Kiln tokenizers older than complete folders (one EOS per conversation, each reply
    followed by a newline): kept so that their models chat as they were trained."""
    roles = "{" + ", ".join(f"'{role}': '{token}'" for role, token in ROLE_TOKENS.items()) + "}"
    return (
        f"{{% set roles = {roles} %}}"
        "{% for message in messages %}{{ roles[message['role']] }}\n{{ message['content'] }}\n{% endfor %}"
        f"{{% if add_generation_prompt %}}{ROLE_TOKENS['assistant']}\n{{% else %}}{EOS_TOKEN}{{% endif %}}"
    )


def kiln_tokenizer(raw: Tokenizer, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer `train_bpe` made, as a transformers tokenizer: EOS (also its pad), the mask token, and Kiln's
    chat template when it has the role tokens (or chat_template, for the legacy one)."""
    from transformers import PreTrainedTokenizerFast

    vocab = raw.get_vocab()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        **({"mask_token": MASK_TOKEN} if MASK_TOKEN in vocab else {}),  # data prepared before it lacks it
    )
    if all(token in vocab for token in CHAT_SPECIAL_TOKENS):
        tokenizer.chat_template = chat_template or kiln_chat_template()
    return tokenizer


def legacy_kiln_tokenizer(tokenizer_json: str) -> PreTrainedTokenizerFast:
    """A folder Kiln wrote before complete tokenizer folders (tokenizer.json alone), with the specials it had."""
    return kiln_tokenizer(Tokenizer.from_str(tokenizer_json), chat_template=legacy_chat_template())


def load(folder_url: str) -> PreTrainedTokenizerBase:
    """The transformers tokenizer in a folder (local or object storage), from local files only."""
    if not storage.is_local(folder_url):
        with storage.local_folder(folder_url) as folder:
            return load(folder)
    path = storage.filesystem(folder_url)[1]
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        try:
            with open(os.path.join(path, TOKENIZER_FILE), encoding="utf-8") as f:
                return legacy_kiln_tokenizer(f.read())
        except FileNotFoundError:
            pass  # another kind of folder (vocab/merges, sentencepiece): transformers reads it or says why not
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise TokenizerError(
            f"no tokenizer Kiln can read in {folder_url} ({message}): give a folder saved with "
            "save_pretrained (tokenizer.json and tokenizer_config.json)"
        ) from None


def is_folder(folder_url: str) -> bool:
    """Whether folder_url holds a tokenizer (tokenizer.json, or a tokenizer_config.json beside other files)."""
    return any(storage.exists(storage.join(folder_url, name)) for name in (TOKENIZER_FILE, CONFIG_FILE))


def folder_files(folder_url: str) -> list[str]:
    """The names of a folder's tokenizer files (TOKENIZER_FILES that are there)."""
    present = set(storage.list_names(folder_url))
    return [name for name in TOKENIZER_FILES if name in present]


def copy_folder(source_url: str, target_url: str) -> str:
    """Copy a tokenizer folder's files unchanged; returns their sha256 (`folder_sha`)."""
    for name in folder_files(source_url):
        storage.write_atomic(storage.join(target_url, name), storage.read_bytes(storage.join(source_url, name)))
    return folder_sha(target_url)


def as_transformers(tokenizer: PreTrainedTokenizerBase | Tokenizer) -> PreTrainedTokenizerBase:
    """A transformers tokenizer as it is; one `train_bpe` made, wrapped as Kiln's (`kiln_tokenizer`)."""
    return kiln_tokenizer(tokenizer) if isinstance(tokenizer, Tokenizer) else tokenizer


def train_kiln_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Kiln's own tokenizer, complete: byte-level BPE trained on texts, then the mask and chat role tokens
    (reserved at the end, so the trained ids do not depend on them and any run's model can learn to chat)."""
    raw = train_bpe(texts, vocab_size)
    raw.add_special_tokens(CHAT_SPECIAL_TOKENS)
    return kiln_tokenizer(raw)


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A text's ids as the tokenizer encodes it, with the specials its post-processor adds (a Llama BOS)."""
    return list(tokenizer(text)["input_ids"])


def document_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A pretraining document's ids (`text_ids`), ending with the tokenizer's EOS."""
    ids = text_ids(tokenizer, text)
    eos = tokenizer.eos_token_id
    return ids if ids and ids[-1] == eos else [*ids, eos]


def save(tokenizer: PreTrainedTokenizerBase | Tokenizer, folder_url: str) -> str:
    """Write a tokenizer (transformers', or one train_bpe made) into folder_url as save_pretrained does; returns
    the folder's sha256."""
    tokenizer = as_transformers(tokenizer)
    with tempfile.TemporaryDirectory(prefix="kiln-tokenizer-") as staged:
        tokenizer.save_pretrained(staged)
        for name in sorted(os.listdir(staged)):
            with open(os.path.join(staged, name), "rb") as f:
                storage.write_atomic(storage.join(folder_url, name), f.read())
    return folder_sha(folder_url)


def folder_sha(folder_url: str) -> str:
    """sha256 over a tokenizer folder's files (names and bytes, in name order): equal folders, equal hashes."""
    h = hashlib.sha256()
    for name in sorted(folder_files(folder_url)):
        data = storage.read_bytes(storage.join(folder_url, name))
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class Vocabulary:
    """The ids a task draws on: how many tokens there are, which are special, and the named special tokens."""

    size: int
    specials: tuple[int, ...]
    mask_id: int | None
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id: int | None = None


def vocabulary(tokenizer: PreTrainedTokenizerBase | Tokenizer) -> Vocabulary:
    """A tokenizer's size, special token ids and named special ids, from its own configuration."""
    tokenizer = as_transformers(tokenizer)
    added = tokenizer.added_tokens_decoder
    specials = {i for i, token in added.items() if token.special} | set(tokenizer.all_special_ids)
    return Vocabulary(
        size=len(tokenizer),
        specials=tuple(sorted(specials)),
        mask_id=tokenizer.mask_token_id,
        eos_id=tokenizer.eos_token_id,
        bos_id=tokenizer.bos_token_id,
        pad_id=tokenizer.pad_token_id,
    )


def require_eos(tokenizer: PreTrainedTokenizerBase, where: str) -> int:
    """The tokenizer's EOS id, or TokenizerError naming the folder and the fix."""
    if tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"the tokenizer in {where} has no EOS token (eos_token in its {CONFIG_FILE}); Kiln ends every document "
            "with it: set eos_token there (e.g. with tokenizer.eos_token = ... and save_pretrained)"
        )
    return int(tokenizer.eos_token_id)


def has_generation_markers(template: str | None) -> bool:
    """Whether a chat template marks the assistant's tokens with `{% generation %}` (transformers' assistant mask)."""
    return bool(template) and GENERATION_MARKER.search(str(template)) is not None
