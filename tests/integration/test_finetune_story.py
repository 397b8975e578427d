"""The whole model life in one story: pretrain a tiny causal LM on synthetic text, `kiln export` it, fine-tune
it with LoRA (`task=sft`) on a small instruction set, and talk to it.

The pretraining text teaches copying ("cloud moon fish, cloud moon fish."); the instruction set asks for it
in the chat template ("repeat: cloud moon fish" -> "cloud moon fish"). Only the LoRA adapters train, and
the held-out prompts are word combinations the fine-tuning never saw: the model generalises the
instruction, it does not memorise answers.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import BIN, REPO, kiln, rows, torchrun

pytestmark = pytest.mark.slow

WORDS = [
    "fox",
    "lamp",
    "river",
    "stone",
    "cloud",
    "apple",
    "bird",
    "chair",
    "moon",
    "tree",
    "door",
    "fish",
    "road",
    "star",
    "cup",
    "hat",
]
LOCAL = {"RAY_ADDRESS": "127.0.0.1:9"}  # a stale cluster address: kiln starts its own local Ray
SHAPE = ["data=prepared", "data.seq_len=64", "train.global_batch=8", "train.micro_batch=8", "tracker=none"]
SHAPE += ["train.eval_batches=2", "optim.warmup_steps=10"]
PRETRAIN = [*SHAPE, "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.n_positions=64"]
PRETRAIN += ["optim.lr=3e-3", "train.max_steps=2500", "train.eval_every=500", "train.checkpoint_every=2500"]
LORA = [*SHAPE, "task=sft", "model.lora.r=16", "model.lora.alpha=32", "optim.lr=1e-2", "train.max_steps=400"]
LORA += ["train.eval_every=200", "train.checkpoint_every=200", "cluster.num_workers=1"]


def phrase(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_story_data(folder: Path) -> list[str]:
    """Pretraining text, 600 "repeat: ..." conversations, and the 100 held-out phrases returned."""
    rng = random.Random(0)
    with open(folder / "pretrain.jsonl", "w") as out:
        for _ in range(3000):
            copies = [phrase(rng, rng.randint(2, 4)) for _ in range(3)]
            out.write(json.dumps({"text": " ".join(f"{p}, {p}." for p in copies)}) + "\n")
    phrases: set[str] = set()
    while len(phrases) < 700:
        phrases.add(phrase(rng, 3))
    ordered = sorted(phrases)
    rng.shuffle(ordered)
    with open(folder / "chat.jsonl", "w") as out:
        for text in ordered[:600]:
            out.write(json.dumps({"prompt": f"repeat: {text}", "response": text}) + "\n")
    return ordered[600:]


def run_kiln(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "kiln"), *args], input=stdin, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_pretrain_export_lora_sft_then_generate_and_chat(tmp_path):
    held_out = write_story_data(tmp_path)
    root, base = tmp_path / "runs", tmp_path / "base"
    prepared = kiln(
        "prepare", f"input={tmp_path / 'pretrain.jsonl'}", f"output={tmp_path / 'text'}", "seq_len=64",
        "vocab_size=300", "val_fraction=0.05", env=LOCAL,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    torchrun(*PRETRAIN, f"data.path={tmp_path / 'text'}", "run.id=pre", f"storage.root={root}", nproc=1)
    pretrain_loss = [r["val/loss"] for r in rows(root / "pre") if "val/loss" in r]
    assert pretrain_loss[-1] < 1.3 < 5.0 < pretrain_loss[0], pretrain_loss  # the copies became predictable
    run_kiln("export", "pre", "--out", str(base), "--storage-root", str(root))

    # Fine-tuning data in the base model's own tokenizer, then LoRA on it through the embedded Ray.
    prepared = kiln(
        "prepare", f"input={tmp_path / 'chat.jsonl'}", f"output={tmp_path / 'chat'}", "kind=chat",
        f"tokenizer={base}", "seq_len=64", "val_fraction=0.1", env=LOCAL,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    trained = kiln(
        "train", *LORA, f"data.path={tmp_path / 'chat'}", f"model.init_from={base}", "run.id=sft",
        f"storage.root={root}", env=LOCAL, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    evaluations = {r["step"]: r for r in rows(root / "sft") if "val/loss" in r}
    assert sorted(evaluations) == [0, 200, 400]
    assert evaluations[400]["val/accuracy"] > 0.8 > evaluations[0]["val/accuracy"], evaluations

    # Greedy replies to prompts it never saw: the instruction generalises.
    prompts = "".join(f"repeat: {text}\n" for text in held_out)
    replies = run_kiln("generate", "sft", "--chat", "--prompt", "-", "--storage-root", str(root), stdin=prompts)
    answers = replies.stdout.splitlines()
    share = sum(answer == text for answer, text in zip(answers, held_out, strict=True)) / len(held_out)
    print(f"held-out prompts answered correctly: {share:.2f}")
    assert share >= 0.8, list(zip(answers, held_out, strict=True))[:10]

    # A piped two-turn conversation: one reply a line, both right.
    first, second = held_out[0], held_out[1]
    chat = run_kiln("chat", "sft", "--storage-root", str(root), stdin=f"repeat: {first}\nrepeat: {second}\n")
    assert chat.stdout.splitlines() == [first, second], chat.stdout

    # The merged model evaluates as the run logged; the adapter alone, on the base, is the same model.
    logged = {k: v for k, v in evaluations[400].items() if k.startswith("val/")}
    evaluated = json.loads(run_kiln("eval", "sft", "--json", "--storage-root", str(root)).stdout)
    for name, value in logged.items():
        assert evaluated["metrics"][name] == pytest.approx(value, rel=1e-4), name
    run_kiln("export", "sft", "--out", str(tmp_path / "merged"), "--storage-root", str(root))
    run_kiln("export", "sft", "--adapter", "--out", str(tmp_path / "adapter"), "--storage-root", str(root))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_on_a_strategy_peft_cannot_shard_is_refused_in_one_line(tmp_path):
    result = kiln(
        "train", "model.init_from=/models/base", "model.lora.r=8", "strategy=zero3_offload",
        f"storage.root={tmp_path}", env=LOCAL,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert "model.lora with strategy=zero3_offload: LoRA on a strategy peft cannot shard" in message
    assert "use one of ddp, fsdp, zero1, zero2, zero3" in message
    assert not list(tmp_path.iterdir())  # nothing registered
