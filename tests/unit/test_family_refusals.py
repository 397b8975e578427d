"""What Kiln cannot honour about a model family is refused in one line with exit 2, before anything starts:
a tokenizer without EOS, a chat template missing where chat data needs one, MoE keys on a dense model.
(The CLI runs in this process: each refusal comes before Ray or any worker would start.)"""

from __future__ import annotations

import json
from dataclasses import replace

from data_pipeline import tokenizer as bpe
from tests.tokenizer_folders import LLAMA3, QWEN2, save_tokenizer


def refused(capsys, *argv: str) -> str:
    """Run the CLI in this process; it must exit 2 with one line on stderr, which is returned."""
    from orchestrator.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_tokenizer_without_eos_or_without_a_chat_template_is_refused_naming_the_folder(tmp_path, capsys):
    no_eos = tmp_path / "no-eos"
    tokenizer = bpe.load(str(save_tokenizer(QWEN2, no_eos)))
    tokenizer.eos_token = None
    tokenizer.save_pretrained(no_eos)
    no_template = save_tokenizer(replace(LLAMA3, template=None), tmp_path / "no-template")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    for folder, wanted in ((no_eos, "has no EOS token"), (no_template, "has no chat template")):
        args = [f"input={tmp_path / 'rows.jsonl'}", f"output={tmp_path / 'out'}", "kind=chat", f"tokenizer={folder}"]
        line = refused(capsys, "prepare", *args)
        assert wanted in line and str(folder) in line, line
    assert not (tmp_path / "out").exists()


def test_mixture_of_experts_keys_on_a_dense_llama_are_refused(tmp_path, capsys):
    line = refused(capsys, "train", "model=llama3_tiny", "model.n_experts=4", f"storage.root={tmp_path}")
    assert "model.n_experts" in line and "llama" in line, line
    assert not list(tmp_path.iterdir())  # nothing registered
