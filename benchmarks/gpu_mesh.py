"""The mesh rows of benchmarks/gpu.py: Llama 3 8B on 8 GPUs as FSDP, FSDP x tensor parallel, HSDP and HSDP x tensor
parallel (`parallel.tensor`, `parallel.replicate`), tokens/s per GPU and MFU beside torchtitan's published Llama 3 8B
figures on 8 H100s at seq_len 8192 (5,762 tokens/s/GPU without torch.compile, 6,667 with: torchtitan's
docs/performance.md, FSDP2, bf16, selective activation checkpointing, local batch 1).

Each row is `torchrun --nproc-per-node 8 -m orchestrator.torchrun` on one machine; a machine with fewer GPUs than a
row needs says so in the row instead of running it. `--dry-run` composes every row's config on the CPU for 8
workers and checks the tensor-parallel plan fits the 8B's heads (the model built on the meta device).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import NOT_RUN, Budget, launch, log_tail

GPUS = 8
SEQ_LEN = 8192
LOG_EVERY = 5
WINDOW = (10, 30)  # logged steps: compilation and warm-up before, the last step (eval, save) never reached
TITAN_8B_H100 = {False: 5762.0, True: 6667.0}  # tokens/s per GPU, by torch.compile


@dataclass(frozen=True)
class MeshRow:
    """One way to lay 8 GPUs out: its name and the parallel.* settings."""

    name: str
    tensor: int
    replicate: int

    def shape(self) -> tuple[int, int, int]:
        """(replicate, shard, tensor) on GPUS ranks."""
        return self.replicate, GPUS // (self.replicate * self.tensor), self.tensor


ROWS = (
    MeshRow("FSDP", tensor=1, replicate=1),
    MeshRow("FSDP x TP", tensor=2, replicate=1),
    MeshRow("HSDP", tensor=1, replicate=2),
    MeshRow("HSDP x TP", tensor=2, replicate=2),
)


def overrides(row: MeshRow, root: str, run_id: str, compiled: bool = False) -> list[str]:
    """A row's `orchestrator.torchrun` overrides: one sequence of 8192 tokens per data-parallel rank a step."""
    data_parallel = row.replicate * row.shape()[1]
    never = WINDOW[1] + LOG_EVERY
    settings = {
        "model": "llama3_8b", "data": "stdlib", "data.seq_len": SEQ_LEN, "strategy": "fsdp",
        "strategy.precision": "bf16", "model.activation_checkpointing": "true", "model.compile": str(compiled).lower(),
        "parallel.tensor": row.tensor, "parallel.replicate": row.replicate,
        "train.micro_batch": 1, "train.global_batch": data_parallel, "train.log_every": LOG_EVERY,
        "train.max_steps": never, "train.eval_every": never, "train.checkpoint_every": never, "train.eval_batches": 1,
        "train.torch_threads": 0, "train.deterministic": "false", "tracker": "none",
        "run.id": run_id, "storage.root": root,
    }  # fmt: skip
    return [f"{key}={value}" for key, value in settings.items()]


def compose_row(row: MeshRow) -> Any:
    """A row's composed config for GPUS workers (UsageError if it does not compose)."""
    from orchestrator.config import compose_config

    return compose_config([f"cluster.num_workers={GPUS}", *overrides(row, "/tmp/kiln-bench-gpu", "dry")])


def check_plan(cfg: Any, tensor: int) -> None:
    """The 8B built on the meta device takes the row's tensor-parallel split (ConfigError if its heads do not)."""
    import torch

    from trainers.models import build_from_config
    from trainers.parallel import check_tensor_parallel

    with torch.device("meta"):
        model = build_from_config("AutoModelForCausalLM", cfg.model, cfg.model.vocab_size or cfg.data.vocab_size, 0)
    if tensor > 1:
        check_tensor_parallel(model, tensor)


def dry_run() -> int:
    """Compose every row for 8 workers and check its plan; 1 if a row fails."""
    from orchestrator.config import UsageError
    from trainers.config import ConfigError

    bad = 0
    for row in ROWS:
        try:
            cfg = compose_row(row)
            check_plan(cfg, row.tensor)
            mesh = cfg.mesh(GPUS)
            print(f"mesh {row.name}: composes as {mesh} on {GPUS} GPUs, grad_accum {cfg.grad_accum}")
        except (UsageError, ConfigError) as exc:
            print(f"mesh {row.name}: {exc}")
            bad += 1
    return 1 if bad else 0


def measure(work: Path, env: dict, budget: Budget, entries: list[dict], save: Any, compiled: bool = False) -> None:
    """Run each row that this machine has the GPUs for, within the budget, into entries."""
    import torch

    count = torch.cuda.device_count()
    for row in ROWS:
        entry: dict[str, Any] = {"row": row.name, "shape": list(row.shape()), "compile": compiled}
        if count < GPUS:
            entry["not_run"] = f"not run: needs {GPUS} GPUs, this machine has {count}"
        elif budget.left() is not None and budget.left() < 300:
            entry["not_run"] = NOT_RUN
        else:
            entry.update(run_row(work, env, row, budget, compiled))
        entries.append(entry)
        save()


def run_row(work: Path, env: dict, row: MeshRow, budget: Budget, compiled: bool) -> dict:
    """One row's run, stopped once the window's last step is logged: tokens/s per GPU and MFU, or why it failed."""
    run_id = "mesh-" + row.name.lower().replace(" x ", "-").replace(" ", "-")
    log, metrics, started = work / f"{run_id}.log", work / run_id / "metrics.jsonl", time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(GPUS)]
    cmd += ["-m", "orchestrator.torchrun", *overrides(row, str(work), run_id, compiled)]
    code = launch(cmd, env, log, budget.left(), done=lambda: logged(metrics, WINDOW[1]))
    if code != 0:
        return {"failed": "timed out" if code == -1 else f"exit code {code}", "log_tail": log_tail(log)}
    rows = {r["step"]: r for r in map(json.loads, metrics.read_text().splitlines()) if "perf/step_time_s" in r}
    skip, end = WINDOW
    seconds = rows[end]["time"] - rows[skip]["time"]  # wall clock between the logged rows, as benchmarks/gpu.py times
    tokens_per_step = row.replicate * row.shape()[1] * SEQ_LEN  # train.global_batch sequences of SEQ_LEN
    per_gpu = (end - skip) * tokens_per_step / seconds / GPUS
    return {"wall_s": time.time() - started, "tokens_per_s_per_gpu": per_gpu, "mfu": rows[end].get("perf/mfu"),
            "loss": rows[end]["train/loss"]}  # fmt: skip


def logged(metrics: Path, step: int) -> bool:
    """Whether the run logged its training row of `step` yet."""
    if not metrics.exists():
        return False
    return any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line.strip())


def render(entries: list[dict]) -> list[str]:
    """The mesh table beside torchtitan's published figure."""
    lines = [
        f"Llama 3 8B (conf/model/llama3_8b.yaml), seq_len {SEQ_LEN}, bf16, activation checkpointing, one sequence per "
        f"data-parallel rank a step, {GPUS} GPUs of one machine; torchtitan's published 8 x H100 figure for the same "
        f"shape: {TITAN_8B_H100[False]:,.0f} tokens/s/GPU ({TITAN_8B_H100[True]:,.0f} compiled).",
        "",
        "| mesh | (replicate, shard, tensor) | tokens/s per GPU | MFU | vs torchtitan |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        shape = ", ".join(map(str, e["shape"]))
        if "tokens_per_s_per_gpu" not in e:
            lines.append(f"| {e['row']} | ({shape}) | {e.get('not_run') or e.get('failed')} | | |")
            continue
        mfu = f"{e['mfu']:.1%}" if e.get("mfu") is not None else "-"
        ratio = e["tokens_per_s_per_gpu"] / TITAN_8B_H100[e["compile"]]
        lines.append(f"| {e['row']} | ({shape}) | {e['tokens_per_s_per_gpu']:,.0f} | {mfu} | {ratio:.0%} |")
    return lines
