"""Hugging Face `Trainer` on the quickstart's model and data: the second baseline of benchmarks/throughput.py.

    torchrun --standalone --nproc-per-node 2 benchmarks/hf_trainer.py SPEC.json OUT.json

SPEC.json is the one benchmarks/bare_ddp.py reads: the same prepared train shards (in memory), GPT-2 shape,
batch, AdamW settings, warmup + cosine schedule (to the same floor) and steps. DDP over gloo on CPU
(`use_cpu`, `ddp_backend="gloo"`); no evaluation, saving, logging or progress bar. A callback on rank 0
records time.time() at the end of every optimizer step (`on_step_end`) to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bare_ddp import train_sequences  # a sibling script (torchrun runs this file, not a package)


class Sequences(torch.utils.data.Dataset):
    """The train split's sequences as causal-LM examples (labels are the inputs; the model shifts them)."""

    def __init__(self, sequences: np.ndarray):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(self.sequences[index].astype(np.int64))
        return {"input_ids": tokens, "labels": tokens}


class StepClock(TrainerCallback):
    """time.time() at the end of each optimizer step, by step number."""

    def __init__(self) -> None:
        self.step_end: dict[str, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end[str(state.global_step)] = time.time()


def main(spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = spec["micro_batch"]
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=spec["steps"],
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=spec["global_batch"] // (micro * world),
            learning_rate=spec["lr"],
            weight_decay=spec["weight_decay"],
            adam_beta1=spec["betas"][0],
            adam_beta2=spec["betas"][1],
            adam_epsilon=spec["eps"],
            max_grad_norm=spec["grad_clip"],
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]},
            warmup_steps=spec["warmup_steps"],
            optim="adamw_torch",
            use_cpu=True,
            ddp_backend="gloo",
            ddp_find_unused_parameters=False,
            dataloader_pin_memory=False,
            dataloader_num_workers=0,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=spec["seed"],
        )
        clock = StepClock()
        trainer = Trainer(
            model=GPT2LMHeadModel(GPT2Config(**spec["model"])),
            args=args,
            train_dataset=Sequences(train_sequences(spec["dataset"])),
            callbacks=[clock],
        )
        trainer.train()
        if trainer.is_world_process_zero():
            Path(out).write_text(json.dumps({"step_end": clock.step_end}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
