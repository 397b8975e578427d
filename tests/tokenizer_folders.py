"""Tokenizer folders in the conventions of today's model families, built here (trained BPE, never downloaded).

Each is saved with `save_pretrained` as the family ships it: Llama 3 (BOS added by its post-processor,
`<|eot_id|>` as EOS, `<|finetune_right_pad_id|>` as pad, its chat template), Qwen2 (ChatML, no BOS,
`<|im_end|>` as EOS) and Mistral (`[INST]` template that refuses a system message, `<s>`/`</s>`, no pad). None
uses Kiln's own tokens or template: Kiln must take everything from the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Llama 3 Instruct's chat template, as published in its tokenizer_config.json.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2's ChatML template (a default system message when the conversation has none).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral 7B Instruct v0.1's template: roles must alternate, and a system message raises.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "repeat: cloud moon fish. cloud moon fish",
    "what is one plus one? one plus one is two.",
    "hello there, how are you today? I am well, thank you.",
    "def add(a, b):\n    return a + b\n",
] * 40


@dataclass(frozen=True)
class Family:
    """How one model family's tokenizer is configured."""

    name: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    template: str | None
    end_of_turn: str  # the token that ends a reply in its template
    bos_by_post_processor: bool = False


LLAMA3 = Family(
    "llama3",
    (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad="<|finetune_right_pad_id|>",
    template=LLAMA3_TEMPLATE,
    end_of_turn="<|eot_id|>",
    bos_by_post_processor=True,
)
QWEN2 = Family(
    "qwen2",
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    template=CHATML_TEMPLATE,
    end_of_turn="<|im_end|>",
)
MISTRAL = Family(
    "mistral",
    ("<unk>", "<s>", "</s>"),
    bos="<s>",
    eos="</s>",
    pad=None,
    template=MISTRAL_TEMPLATE,
    end_of_turn="</s>",
    bos_by_post_processor=True,
)
FAMILIES = (LLAMA3, QWEN2, MISTRAL)


def build_tokenizer(family: Family, vocab_size: int = 400, texts: list[str] | None = None):
    """A transformers tokenizer of the family's conventions, trained on texts (a small built-in corpus if None)."""
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts or CORPUS, trainer=trainer)
    if family.bos_by_post_processor and family.bos:
        bos = (family.bos, raw.token_to_id(family.bos))
        raw.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[bos]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token="<unk>" if "<unk>" in family.specials else None,
        model_max_length=2048,
    )
    tokenizer.chat_template = family.template
    return tokenizer


def save_tokenizer(family: Family, folder: Path, vocab_size: int = 400, texts: list[str] | None = None) -> Path:
    """The family's tokenizer saved into folder (save_pretrained); returns the folder."""
    build_tokenizer(family, vocab_size, texts).save_pretrained(folder)
    return folder
