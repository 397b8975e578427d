"""The whole model life in one story, on the family users bring: pretrain a tiny Llama (`model=llama3_tiny`,
GQA, SwiGLU, RoPE, RMSNorm) from config with a Llama-3-style tokenizer (BOS from its post-processor,
`<|eot_id|>` ending each turn, its own chat template), `kiln export` it, fine-tune it with LoRA on every linear
map (`task=sft`, `model.lora.target=all-linear`) on a small instruction set in the model's own template, and
talk to it; transformers on the export answers the same.

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

from tests.helpers import BIN, REPO, kiln, kiln_refused, rows, torchrun
from tests.tokenizer_folders import LLAMA3, save_tokenizer

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
SHAPE = ["data=prepared", "data.seq_len=64", "tracker=none", "train.eval_batches=2", "optim.warmup_steps=10"]
# Fine-tuning rows hold one conversation each (about 40 of their 64 tokens): twice the rows a step.
PRETRAIN = [*SHAPE, "train.global_batch=8", "train.micro_batch=8", "model=llama3_tiny", "model.n_layer=2"]
PRETRAIN += ["model.n_embd=64", "model.intermediate_size=192", "model.n_positions=64"]
PRETRAIN += ["optim.lr=3e-3", "train.max_steps=2500", "train.eval_every=500", "train.checkpoint_every=2500"]
LORA = [*SHAPE, "train.global_batch=16", "train.micro_batch=16", "task=sft", "model.lora.r=16"]
LORA += ["model.lora.alpha=32", "model.lora.target=all-linear"]
LORA += ["optim.lr=1e-2", "train.max_steps=800"]
LORA += ["train.eval_every=400", "train.checkpoint_every=400", "cluster.num_workers=1"]


def phrase(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_story_data(folder: Path) -> list[str]:
    """Pretraining text, 600 "repeat: ..." conversations, a Llama-3-style tokenizer trained on the text (in
    folder/llama-tokenizer), and the 100 held-out phrases returned."""
    rng = random.Random(0)
    texts = []
    with open(folder / "pretrain.jsonl", "w") as out:
        for _ in range(3000):
            copies = [phrase(rng, rng.randint(2, 4)) for _ in range(3)]
            texts.append(" ".join(f"{p}, {p}." for p in copies))
            out.write(json.dumps({"text": texts[-1]}) + "\n")
    save_tokenizer(LLAMA3, folder / "llama-tokenizer", vocab_size=300, texts=[*texts, "repeat: user assistant"])
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
        f"tokenizer={tmp_path / 'llama-tokenizer'}", "val_fraction=0.05", env=LOCAL,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    torchrun(*PRETRAIN, f"data.path={tmp_path / 'text'}", "run.id=pre", f"storage.root={root}", nproc=1)
    pretrain_loss = [r["val/loss"] for r in rows(root / "pre") if "val/loss" in r]
    assert pretrain_loss[-1] < 1.3 < 5.0 < pretrain_loss[0], pretrain_loss  # the copies became predictable
    run_kiln("export", "pre", "--out", str(base), "--storage-root", str(root))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert type(AutoModelForCausalLM.from_pretrained(base)).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(base)  # the Llama tokenizer, unchanged: its template, BOS and EOS
    assert tokenizer.chat_template == LLAMA3.template and tokenizer.eos_token == "<|eot_id|>"

    # Fine-tuning data in the base model's own tokenizer and template, then LoRA on it through the embedded Ray.
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
    assert sorted(evaluations) == [0, 400, 800]
    assert evaluations[800]["val/accuracy"] > 0.8 > evaluations[0]["val/accuracy"], evaluations

    # Greedy replies to prompts it never saw: the instruction generalises.
    prompts = "".join(f"repeat: {text}\n" for text in held_out)
    replies = run_kiln("generate", "sft", "--chat", "--prompt", "-", "--storage-root", str(root), stdin=prompts)
    answers = replies.stdout.splitlines()
    share = sum(answer == text for answer, text in zip(answers, held_out, strict=True)) / len(held_out)
    print(f"held-out prompts answered correctly: {share:.2f}")
    assert share >= 0.8, list(zip(answers, held_out, strict=True))[:10]

    # A piped two-turn conversation: one reply a line. A 64-token model has no room for the first exchange beside
    # the second message (said on stderr), so each reply is the one generate gave that prompt alone.
    first, second = held_out[0], held_out[1]
    chat = run_kiln("chat", "sft", "--storage-root", str(root), stdin=f"repeat: {first}\nrepeat: {second}\n")
    assert chat.stdout.splitlines() == answers[:2], chat.stdout
    assert answers[0] == first and "the history is set aside" in chat.stderr, chat.stderr

    # transformers on the merged export, in the tokenizer's template, answers what kiln chat did and ends at <|eot_id|>
    run_kiln("export", "sft", "--out", str(tmp_path / "merged"), "--storage-root", str(root))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    messages = [{"role": "user", "content": f"repeat: {first}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = merged.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
    assert output[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.decode(output)
    assert tokenizer.decode(output, skip_special_tokens=True) == first

    # The merged model evaluates as the run logged; the adapter alone, on the base, is the same model.
    logged = {k: v for k, v in evaluations[800].items() if k.startswith("val/")}
    evaluated = json.loads(run_kiln("eval", "sft", "--json", "--storage-root", str(root)).stdout)
    for name, value in logged.items():
        assert evaluated["metrics"][name] == pytest.approx(value, rel=1e-4), name
    run_kiln("export", "sft", "--adapter", "--out", str(tmp_path / "adapter"), "--storage-root", str(root))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    from peft import PeftModel

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_on_a_strategy_peft_cannot_shard_is_refused_in_one_line(tmp_path):
    result = kiln_refused(
        "train", "model.init_from=/models/base", "model.lora.r=8", "strategy=zero3_offload", f"storage.root={tmp_path}"
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert "model.lora with strategy=zero3_offload: LoRA on a strategy peft cannot shard" in message
    assert "use one of ddp, fsdp, zero1, zero2, zero3" in message
    assert not list(tmp_path.iterdir())  # nothing registered
