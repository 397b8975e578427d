"""`kiln chat` (and `kiln generate`) on the session's tiny SFT run: a piped two-turn conversation, /reset,
the exported folder chatting exactly like the run, and each bad input as one line with exit 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import BIN, REPO

pytestmark = pytest.mark.slow

TURNS = ["what is 3 plus 4?", "what is 10 plus 20?", "/reset", "what is 3 plus 4?"]


def kiln_in(run_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`kiln ARGS --storage-root ROOT` with piped stdin; it must succeed."""
    result = subprocess.run(
        [str(BIN / "kiln"), *args, "--storage-root", str(run_dir.parent)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def conversation(sft_run) -> subprocess.CompletedProcess:
    """Piped `kiln chat sft`: two turns, /reset, then the first turn again."""
    return kiln_in(sft_run, "chat", "sft", "--max-new-tokens", "16", stdin="\n".join(TURNS) + "\n")


def test_piped_chat_answers_each_turn_on_its_own_line_and_reset_forgets(conversation):
    # One line a turn, whatever the model says: after 30 steps of SFT on 2 CPUs its greedy reply may still be
    # empty (it ends the turn at once). That it answers correctly is the longer fine-tuning story's to show.
    replies = conversation.stdout.split("\n")[:-1]
    assert conversation.returncode == 0 and len(replies) == 3, conversation.stdout + conversation.stderr
    # After /reset the same first turn meets an empty history again: greedy decoding gives the same reply.
    assert replies[2] == replies[0]
    assert "history cleared" in conversation.stderr


def test_an_exported_folder_chats_and_evaluates_exactly_like_the_run(sft_run, chat_data, conversation, tmp_path):
    out = tmp_path / "hf"
    kiln_in(sft_run, "export", "sft", "--out", str(out))
    from transformers import AutoTokenizer

    from data_pipeline import tokenizer as bpe

    # the run's tokenizer folder, unchanged: other tools chat in the same template
    assert AutoTokenizer.from_pretrained(out).chat_template == bpe.load(str(sft_run / "tokenizer")).chat_template
    again = kiln_in(sft_run, "chat", str(out), "--max-new-tokens", "16", stdin="\n".join(TURNS) + "\n")
    assert again.stdout == conversation.stdout
    # The export says which Kiln task trained it: kiln eval scores the folder on the replies, as the run.
    recorded = json.loads((out / "config.json").read_text())
    assert (recorded["kiln_task"], recorded["kiln_seq_len"]) == ("sft", 64)
    same_slice = ["--data", str(chat_data), "--micro-batch", "4", "--batches", "2", "--json"]
    by_run = json.loads(kiln_in(sft_run, "eval", "sft", *same_slice).stdout)
    by_folder = json.loads(kiln_in(sft_run, "eval", str(out), *same_slice).stdout)
    for key in ("val/loss", "val/accuracy"):
        assert by_folder["metrics"][key] == pytest.approx(by_run["metrics"][key], rel=1e-5), key
    # Without its chat template the folder is refused, in one line.
    (out / "chat_template.jinja").unlink(missing_ok=True)  # where transformers 5 keeps it
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    refused = subprocess.run([str(BIN / "kiln"), "chat", str(out)], input="hi\n", capture_output=True, text=True)
    assert refused.returncode == 2 and "has no chat template" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_generate_on_an_sft_run_completes_a_prompt_in_the_chat_template(sft_run, conversation):
    prompt = "<|user|>\nwhat is 3 plus 4?\n<|assistant|>\n"
    result = kiln_in(sft_run, "generate", "sft", "--prompt", prompt, "--max-new-tokens", "16")
    assert result.stdout.strip() == conversation.stdout.splitlines()[0]


def test_bad_targets_are_one_line_and_exit_2(sft_run, tmp_path, capsys):
    from orchestrator.cli import main

    for argv, expected in (
        (["chat", "nope", "--storage-root", str(sft_run.parent)], "unknown run 'nope'"),
        (["chat", str(tmp_path)], "not a Hugging Face model folder"),
        (["chat", "sft", "--max-new-tokens", "64", "--storage-root", str(sft_run.parent)], "leaves no room"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
