"""`kiln export` keeps the model's identity: the run's tokenizer folder unchanged, its special ids in the
model's config, generation stopping at the template's end of turn, and transformers on the export answering
what Kiln answers."""

from __future__ import annotations

import filecmp

import pytest

from data_pipeline import tokenizer as bpe
from tests.tokenizer_folders import LLAMA3, QWEN2, save_tokenizer


def tiny_llama(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_cache=False,  # as Kiln trains it
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family", [LLAMA3, QWEN2], ids=lambda f: f.name)
def test_an_export_keeps_the_tokenizer_and_transformers_chats_on_it_as_kiln_does(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.export import save_hugging_face
    from trainers.inference.loaded_model import Sampling, generate, load_folder

    source = save_tokenizer(family, tmp_path / "tokenizer")
    tokenizer = bpe.load(str(source))
    save_hugging_face(tiny_llama(len(tokenizer)), str(source), str(tmp_path / "out"), task="sft", seq_len=64)
    out = tmp_path / "out"
    for name in bpe.folder_files(str(source)):  # byte for byte: special tokens, template, model_max_length
        assert filecmp.cmp(source / name, out / name, shallow=False), name
    exported = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert len(exported) <= model.get_input_embeddings().num_embeddings
    assert model.config.use_cache and model.config.eos_token_id == exported.eos_token_id
    end_of_turn = exported.convert_tokens_to_ids(family.end_of_turn)
    assert end_of_turn in model.generation_config.eos_token_id

    messages = [{"role": "user", "content": "what is one plus one?"}]
    ids = exported.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    theirs = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = exported.decode(theirs[0, ids.shape[1] :], skip_special_tokens=True)
    (ours,) = generate(load_folder(str(out)), [messages[0]["content"]], Sampling(max_new_tokens=12), chat=True)
    assert ours == answer.rstrip("\n")
