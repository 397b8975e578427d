"""Llama 3 1B and 8B on one GPU: Kiln's tokens/s and MFU beside torchtitan's, the same shape, batch and sequence
trained in the same call (`benchmarks/gpu.py --only llama`; a full run adds these rows after its cases).

A row (ROWS) trains `model=llama3_1b|llama3_8b` (built from config) with strategy=fsdp, bf16, 8 sequences of 2,048
tokens a step on the built-in corpus and Kiln's own tokenizer; torchtitan then trains its flavour of that shape
(checked: TITAN_FLAVORS) at the same micro-batch, batch, sequence, checkpointing and compile setting, right after, so
a lease that ends early still has whole pairs. AdamW in fp32 holds 16 bytes a parameter, 120 GiB for the 8B: it fits
an H200 at micro-batch 1 with checkpointing per layer, not an H100 (nor the hosts' 128 GiB, offloaded), and is skipped
with that reason on a smaller GPU. Both are timed alike: tokens/s between two logged steps (both log every LOG_EVERY
steps), warm-up left out; Kiln's run is stopped once that window is logged (its final evaluation and checkpoint are
not timed). MFU for both uses Kiln's FLOPs per token (trainers/flops.py model_flops_per_token).

torchtitan comes from PyPI wheels in .whl/titan (benchmarks/gpu_wheels.sh), installed offline into the work folder:
0.3.0 where torch has what it imports (torch.distributed.fsdp.DataParallelMeshDims; torch 2.11 lacks it), else 0.2.2.
0.3.0 runs FSDP2, FlexAttention and CUDA graphs on one GPU (its defaults); 0.2.2 runs without FSDP under autocast, with
SDPA, and gets its missing 1B flavour from add_titan_1b. Offline, its tokenizer is Kiln's tokenizer folder and its data
the corpus's train files as JSON lines (write_titan_inputs).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import NOT_RUN, REPO, TORCHRUN, Budget, compose, launch, log_tail, paragraph

SEQ_LEN = 2048
GLOBAL_BATCH = 8
TOKENS_PER_STEP = GLOBAL_BATCH * SEQ_LEN
LOG_EVERY = 5
LR = 3e-4
WARMUP_STEPS = 5
QUICK_WINDOW = (5, 10)
WHEELS = REPO / ".whl" / "titan"
TITAN_LATEST, TITAN_OLDER = "0.3.0", "0.2.2"
# Each preset's torchtitan flavour and the shape both must have (torchtitan/models/llama3/__init__.py, 0.3.0).
TITAN_FLAVORS = {
    "llama3_1b": ("1B", {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 8192}),
    "llama3_8b": ("8B", {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 14336}),
}
LLAMA3 = {"vocab_size": 128256, "rope_theta": 500000.0}


@dataclass(frozen=True)
class Row:
    """One model's pair of runs: preset, micro-batch, checkpointing, measured window and what the pair needs."""

    preset: str
    micro_batch: int
    checkpointing: bool  # activation checkpointing per decoder layer
    skip: int  # a logged step: the window starts there
    end: int  # a logged step: the window ends there, and so do the runs
    gpu_gib: float  # GPU memory the pair needs
    seconds: float  # lease time the pair needs, start-up included: a shorter budget skips it rather than cuts it


ROWS = (
    Row("llama3_1b", micro_batch=4, checkpointing=False, skip=10, end=40, gpu_gib=60, seconds=180),
    # Kiln builds the 8B on the CPU (8B random draws, a minute or two) before its first step.
    Row("llama3_8b", micro_batch=1, checkpointing=True, skip=10, end=20, gpu_gib=130, seconds=240),
)


def kiln_overrides(row: Row, root: str, run_id: str, end: int, compiled: bool = False) -> list[str]:
    """The `kiln train` overrides of a row's Kiln run. It is stopped once step `end` is logged: its last step, which
    evaluates and saves a checkpoint, is never reached. Not deterministic: torchtitan's runs are not either."""
    never = end + LOG_EVERY
    settings = {
        "strategy": "fsdp", "strategy.precision": "bf16", "model.compile": str(compiled).lower(),
        "model.activation_checkpointing": str(row.checkpointing).lower(),
        "train.micro_batch": row.micro_batch, "train.global_batch": GLOBAL_BATCH, "train.log_every": LOG_EVERY,
        "train.max_steps": never, "train.eval_every": never, "train.checkpoint_every": never,
        "train.eval_batches": 1, "train.torch_threads": 0, "train.deterministic": "false",
        "optim.lr": LR, "optim.warmup_steps": WARMUP_STEPS, "tracker": "none", "run.id": run_id, "storage.root": root,
    }  # fmt: skip
    return [*corpus_overrides(row.preset), *(f"{key}={value}" for key, value in settings.items())]


def corpus_overrides(preset: str) -> list[str]:
    """The model and the data every run of these rows trains on."""
    return [f"model={preset}", "data=stdlib", f"data.seq_len={SEQ_LEN}"]


def kiln_config(row: Row) -> Any:
    """A row's composed Kiln config (what its run would train)."""
    from orchestrator.config import compose_config

    return compose_config(["cluster.num_workers=1", *kiln_overrides(row, "/tmp/kiln-bench-gpu", "dry", row.end)])


def kiln_shape(model: Any) -> dict[str, Any]:
    """A Kiln model config's shape, in TITAN_FLAVORS' terms with LLAMA3's keys."""
    heads = {"n_heads": model.n_head, "n_kv_heads": model.n_kv_head}
    return {"dim": model.n_embd, "n_layers": model.n_layer, **heads, "ffn_dim": model.intermediate_size,
            "vocab_size": model.vocab_size, "rope_theta": model.rope_theta}  # fmt: skip


def kiln_flops(cfg: Any) -> float:
    """Training FLOPs per token of a composed config's model (built on the meta device: no memory, no time)."""
    import torch

    from trainers.flops import model_flops_per_token
    from trainers.models import build_from_config

    with torch.device("meta"):
        # The preset's vocab_size, else the tokenizer's Kiln trains (data.vocab_size), padded as a run pads it.
        model = build_from_config("AutoModelForCausalLM", cfg.model, cfg.model.vocab_size or cfg.data.vocab_size, 0)
    return model_flops_per_token(model, cfg.data.seq_len)


def titan_plan(row: Row, end: int, compiled: bool = False) -> dict[str, Any]:
    """What torchtitan trains for a row, as plain data: its flavour, and Kiln's batch, sequence and settings."""
    return {
        "flavor": TITAN_FLAVORS[row.preset][0], "local_batch_size": row.micro_batch, "global_batch_size": GLOBAL_BATCH,
        "seq_len": SEQ_LEN, "steps": end, "log_freq": LOG_EVERY, "lr": LR, "warmup_steps": WARMUP_STEPS,
        "activation_checkpoint": "full" if row.checkpointing else "none", "compile": compiled,
    }  # fmt: skip


def titan_args(plan: dict[str, Any], version: str, tokenizer: str, data: str, dump: str) -> list[str]:
    """torchtitan's arguments after `-m torchtitan.train` for a plan, in that release's own spelling."""
    shared = {
        "training.local-batch-size": plan["local_batch_size"], "training.global-batch-size": plan["global_batch_size"],
        "training.seq-len": plan["seq_len"], "training.steps": plan["steps"],
        "training.mixed-precision-param": "bfloat16", "training.mixed-precision-reduce": "float32",
        "lr-scheduler.warmup-steps": plan["warmup_steps"], "metrics.log-freq": plan["log_freq"],
        "metrics.disable-color-printing": None, "metrics.no-enable-tensorboard": None, "checkpoint.no-enable": None,
        "compile.enable" if plan["compile"] else "compile.no-enable": None,
    }  # fmt: skip
    if version == TITAN_OLDER:
        return flags({
            "model.name": "llama3", "model.flavor": plan["flavor"], "model.hf-assets-path": tokenizer,
            "job.dump-folder": dump, "training.dataset": "c4_test", "training.dataset-path": data,
            "optimizer.lr": plan["lr"], "activation-checkpoint.mode": plan["activation_checkpoint"],
            "validation.no-enable": None, "profiling.no-enable-profiling": None,
            "experimental.custom-import": "benchmarks.gpu_llama",  # add_titan_1b: 0.2.2 has no 1B flavour
            **shared,
        })  # fmt: skip
    latest = flags({
        "module": "benchmarks.gpu_llama", "config": f"titan_{plan['flavor'].lower()}",  # titan_1b, titan_8b
        "hf-assets-path": tokenizer, "dump-folder": dump,
        "dataloader.dataset": "c4_test", "dataloader.dataset-path": data,
        "optimizer.param-groups.0.optimizer-kwargs.lr": plan["lr"],
        "validator.no-enable": None, "profiler.no-enable-profiling": None,
        **shared,
    })  # fmt: skip
    return [*latest, f"activation-checkpoint:{plan['activation_checkpoint']}"]  # a subcommand: after every option


def flags(options: dict[str, Any]) -> list[str]:
    """Command-line options: `--key=value`, or `--key` alone for a None value (a boolean switch)."""
    return [f"--{key}" if value is None else f"--{key}={value}" for key, value in options.items()]


def check_titan_shape(flavor: str, actual: dict[str, Any]) -> None:
    """Fail if torchtitan's flavour is not the shape Kiln's preset has: the pair would not compare."""
    expected = {**next(shape for name, shape in TITAN_FLAVORS.values() if name == flavor), **LLAMA3}
    if actual != expected:
        raise ValueError(f"torchtitan's {flavor} flavour is {actual}, Kiln's preset {expected}")


def titan_config(flavor: str) -> Any:
    """torchtitan 0.3.0's Trainer.Config of a flavour: its own llama3_8b recipe with that flavour's model (checked);
    the rest comes from titan_args' command line."""
    from torchtitan.models.llama3 import config_registry, model_registry

    config = config_registry.llama3_8b()
    config.model_spec = model_registry(flavor)
    model = config.model_spec.model
    attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
    shape = titan_shape(model.dim, len(model.layers), attention, ffn.w1.out_features, model.vocab_size)
    check_titan_shape(flavor, {**shape, "rope_theta": float(attention.rope.theta)})
    return config


def titan_1b() -> Any:
    """`--config=titan_1b` of torchtitan 0.3.0."""
    return titan_config("1B")


def titan_8b() -> Any:
    """`--config=titan_8b` of torchtitan 0.3.0."""
    return titan_config("8B")


def add_titan_1b() -> None:
    """torchtitan 0.2.2: add 0.3.0's 1B flavour to its llama3 flavours (untied: 0.2.2 cannot tie), then check both
    flavours' shapes on the meta device."""
    import torch
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs, llama3_args

    one_b = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.5)
    llama3_args.setdefault("1B", TransformerModelArgs(**one_b, vocab_size=128256, rope_theta=500000))
    for flavor, _ in TITAN_FLAVORS.values():
        args = llama3_args[flavor]
        with torch.device("meta"):
            layer = Transformer(args).layers["0"]
        ffn_dim = layer.feed_forward.w1.weight.shape[0]
        shape = titan_shape(args.dim, args.n_layers, layer.attention, ffn_dim, args.vocab_size)
        check_titan_shape(flavor, {**shape, "rope_theta": float(args.rope_theta)})


def titan_shape(dim: int, n_layers: int, attention: Any, ffn_dim: int, vocab_size: int) -> dict[str, Any]:
    """A torchtitan model's shape in TITAN_FLAVORS' terms (attention: a layer's, or its config)."""
    heads = {"n_heads": attention.n_heads, "n_kv_heads": attention.n_kv_heads}
    return {"dim": dim, "n_layers": n_layers, **heads, "ffn_dim": ffn_dim, "vocab_size": vocab_size}


def titan_version() -> str:
    """The torchtitan release this torch runs: 0.3.0 imports torch.distributed.fsdp.DataParallelMeshDims."""
    import torch.distributed.fsdp as fsdp

    return TITAN_LATEST if hasattr(fsdp, "DataParallelMeshDims") else TITAN_OLDER


def install_titan(version: str, target: Path) -> None:
    """pip-install torchtitan `version` and the other wheels of .whl/titan into target, offline."""
    wheels = [w for w in sorted(WHEELS.glob("*.whl")) if not w.name.startswith("torchtitan-")]
    wheels += sorted(WHEELS.glob(f"torchtitan-{version}-*.whl"))
    if not any(w.name.startswith("torchtitan-") for w in wheels):
        raise FileNotFoundError(f"no torchtitan {version} wheel in {WHEELS}: run benchmarks/gpu_wheels.sh first")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command = [*pip, "--find-links", str(WHEELS), "--target", str(target), *map(str, wheels)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip install failed: {' '.join(done.stderr.strip().splitlines()[-1:])}")


def write_titan_inputs(cfg: Any, dataset: str, folder: Path, row_chars: int = 1 << 18) -> tuple[str, str]:
    """torchtitan's tokenizer and data folders: Kiln's tokenizer without its chat template (torchtitan's Jinja does
    not know `{% generation %}`), and the corpus's train files as JSON lines of row_chars characters (about 70,000
    tokens) for its `c4_test` loader, which reads any folder datasets.load_dataset reads."""
    from data_pipeline.stdlib_corpus import read_source, split_files, stdlib_files

    tokenizer, data = folder / "tokenizer", folder / "data"
    tokenizer.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(dataset) / "tokenizer" / "tokenizer.json", tokenizer / "tokenizer.json")
    config = json.loads((Path(dataset) / "tokenizer" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # a template inline is read as well as one in chat_template.jinja
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    root, files = stdlib_files(cfg.data.max_files)
    train, _ = split_files(root, files, cfg.data.val_fraction)
    text = "\n".join(read_source(f) for f in train)
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "train.jsonl", "w") as out:
        for start in range(0, len(text), row_chars):
            out.write(json.dumps({"text": text[start : start + row_chars]}) + "\n")
    return str(tokenizer), str(data)


def kiln_window(rows: list[dict], skip: int, end: int) -> dict:
    """Tokens/s between the metrics.jsonl rows of steps skip and end; peak memory (allocated) and the loss at end."""
    train = {r["step"]: r for r in rows if "perf/step_time_s" in r}
    seconds = train[end]["time"] - train[skip]["time"]
    peak = max(r["perf/peak_mem_mb"] for r in train.values()) / 1024
    return {"tokens_per_s": (end - skip) * TOKENS_PER_STEP / seconds, "steps": [skip, end], "peak_mem_gib": peak,
            "memory": "allocated", "loss": train[end]["train/loss"]}  # fmt: skip


TITAN_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+)\s+grad_norm:\s*\S+\s+memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)")


def titan_window(log: str, skip: int, end: int) -> dict:
    """Tokens/s over torchtitan's logged intervals from step skip to end (each line's tps covers the steps since the
    line before); peak memory (reserved) and the loss at end."""
    logged = {int(m[1]): (float(m[2]), float(m[3]), float(m[4].replace(",", ""))) for m in TITAN_LINE.finditer(log)}
    steps = sorted(logged)
    intervals = [(a, b) for a, b in itertools.pairwise(steps) if a >= skip and b <= end]
    if not intervals or intervals[0][0] != skip or intervals[-1][1] != end:
        raise ValueError(f"torchtitan's log has no steps {skip} to {end}: it logged steps {steps}")
    seconds = sum((b - a) * TOKENS_PER_STEP / logged[b][2] for a, b in intervals)
    peak = max(memory for _, memory, _ in logged.values())
    return {"tokens_per_s": (end - skip) * TOKENS_PER_STEP / seconds, "steps": [skip, end], "peak_mem_gib": peak,
            "memory": "reserved", "loss": logged[end][0]}  # fmt: skip


def logged(metrics: Path, step: int) -> bool:
    """Whether a Kiln run's metrics.jsonl has its training row of `step` (or a later one) yet."""
    if not metrics.exists():
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return any(r["step"] >= step and "perf/step_time_s" in r for r in rows)


def strategy_label(system: str, version: str, row: Row) -> str:
    """How a system trains a row on one GPU, as the table says it."""
    checkpointing = ", checkpointing per layer" if row.checkpointing else ""
    if system == "Kiln":
        return "fsdp (FSDP2, bf16)" + checkpointing
    return ("FSDP2, bf16" if version == TITAN_LATEST else "no FSDP, autocast bf16") + checkpointing


def measure(
    work: Path,
    env: dict,
    cache_dir: str,
    budget: Budget,
    entries: list[dict],
    saved: Callable[[], None],
    quick: bool = False,
    compiled: bool = False,
) -> None:
    """Each row's Kiln run, then torchtitan's of the same shape, batch and sequence: an entry per run appended to
    entries, and saved() after each."""
    import torch

    from trainers.flops import peak_flops

    titan = prepare(work, env, cache_dir)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    peak = peak_flops(torch.cuda.get_device_name(0))
    for row in ROWS:
        skip, end = QUICK_WINDOW if quick else (row.skip, row.end)
        flops = kiln_flops(kiln_config(row))
        too_big = f"not run: needs about {row.gpu_gib:.0f} GiB of GPU memory, this GPU has {gpu_gib:.0f}"
        for system in ("Kiln", "torchtitan"):
            entry: dict[str, Any] = {"model": row.preset, "system": system, "compile": compiled}
            entry.update(version=titan["version"] if system == "torchtitan" else None)
            entry.update(strategy=strategy_label(system, titan["version"], row))
            # Kiln's run starts only with time for the pair, so a short lease ends with whole pairs.
            if not budget.allows_a_run(row.seconds if system == "Kiln" else None):
                entry["failed"] = NOT_RUN
            elif gpu_gib < row.gpu_gib:
                entry["failed"] = too_big
            elif system == "Kiln":
                entry.update(run_kiln(work, env, row, (skip, end), timeout_s(budget, row), compiled))
            elif "broken" in titan:
                entry["failed"] = titan["broken"]
            else:
                entry.update(run_titan(work, titan, row, (skip, end), timeout_s(budget, row), compiled))
            if "tokens_per_s" in entry:
                entry["mfu"] = entry["tokens_per_s"] * flops / peak if peak else None
            entries.append(entry)
            saved()


def prepare(work: Path, env: dict, cache_dir: str) -> dict[str, Any]:
    """Untimed, before any run: the corpus and its tokenizer for Kiln, then torchtitan installed, its environment
    and its copy of the text ("broken" says why torchtitan cannot run)."""
    print(f"preparing the corpus at seq_len {SEQ_LEN}", flush=True)
    dataset = common.prepare_corpus(cache_dir, corpus_overrides(ROWS[0].preset))
    version = titan_version()
    paths = [str(work / "titan-site"), str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    titan_env = {**env, "PYTHONPATH": os.pathsep.join(paths), "HF_DATASETS_OFFLINE": "1"}
    titan_env["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
    if version == TITAN_OLDER:
        titan_env["KILN_TITAN_ADD_1B"] = "1"
    titan: dict[str, Any] = {"version": version, "env": titan_env}
    print(f"installing torchtitan {version} from {WHEELS}", flush=True)
    try:
        install_titan(version, work / "titan-site")
        titan["tokenizer"], titan["data"] = write_titan_inputs(kiln_config(ROWS[0]), dataset, work / "titan-inputs")
    except (OSError, RuntimeError) as exc:
        titan["broken"] = f"torchtitan {version} not installed: {exc}"
    return titan


def timeout_s(budget: Budget, row: Row) -> float:
    """A run's time limit: what the budget has left, and never over twice what the row expects (a hang ends)."""
    left = budget.left()
    return 2 * row.seconds if left is None else min(left, 2 * row.seconds)


def run_kiln(work: Path, env: dict, row: Row, window: tuple[int, int], timeout: float, compiled: bool) -> dict:
    """A row's Kiln run, stopped once the window's last step is logged: its window, or why it failed."""
    (skip, end), run_id = window, f"kiln-{row.preset}"
    print(f"{run_id}: steps {skip} to {end} timed", flush=True)
    log, metrics, started = work / f"{run_id}.log", work / run_id / "metrics.jsonl", time.time()
    overrides = kiln_overrides(row, str(work), run_id, end, compiled)
    code = common.torchrun(overrides, env, log, timeout, done=lambda: logged(metrics, end))
    if code != 0:
        return failure(code, log, started)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {"wall_s": time.time() - started, **kiln_window(rows, skip, end)}


def run_titan(work: Path, titan: dict, row: Row, window: tuple[int, int], timeout: float, compiled: bool) -> dict:
    """A row's torchtitan run (steps 1 to the window's last): its window, or why it failed."""
    (skip, end), name = window, f"titan-{row.preset}"
    print(f"{name}: torchtitan {titan['version']}, steps {skip} to {end} timed", flush=True)
    plan = titan_plan(row, end, compiled)
    args = titan_args(plan, titan["version"], titan["tokenizer"], titan["data"], str(work / name))
    log, started = work / f"{name}.log", time.time()
    code = launch([*TORCHRUN, "-m", "torchtitan.train", *args], titan["env"], log, timeout)
    if code != 0:
        return failure(code, log, started)
    try:
        return {"wall_s": time.time() - started, **titan_window(log.read_text(errors="replace"), skip, end)}
    except ValueError as exc:
        return {"wall_s": time.time() - started, "failed": str(exc), "log_tail": log_tail(log)}


def failure(code: int, log: Path, started: float) -> dict[str, Any]:
    """A failed run's entry: how it ended and the end of its log (the machine may be given back before anyone reads
    it)."""
    ended = "timed out" if code == -1 else f"exit code {code}"
    return {"wall_s": time.time() - started, "failed": ended, "log_tail": log_tail(log)}


def render(entries: list[dict]) -> list[str]:
    """The Llama table's lines: a paragraph, then a row per run with Kiln's ratio to torchtitan."""
    titan = {e["model"]: e for e in entries if e["system"] == "torchtitan" and "tokens_per_s" in e}
    lines = [
        paragraph(
            "Llama 3 1B and 8B (conf/model/llama3_1b.yaml, llama3_8b.yaml), 8 sequences of 2,048 tokens a step (1B: "
            "2 micro-batches of 4; 8B: 8 of 1, activation checkpointing per layer), bf16, beside torchtitan training "
            "its flavour of the same shape at the same batch, sequence and checkpointing in the same call "
            "(benchmarks/gpu_llama.py says how). Tokens/s between two logged steps for both; MFU with Kiln's FLOPs per "
            "token for both; peak memory is Kiln's most allocated, torchtitan's most reserved."
        ),
        "",
        "| model | system | strategy | tokens/s | MFU | peak memory (GiB) | Kiln / torchtitan |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        system = e["system"] + (f" {e['version']}" if e.get("version") else "")
        head = f"| {e['model']} | {system} | {e['strategy']} |"
        if "tokens_per_s" not in e:
            lines.append(f"{head} {e.get('failed', 'not run')} | | | |")
            continue
        mfu = f"{e['mfu']:.1%}" if e.get("mfu") is not None else "-"
        peer = titan.get(e["model"]) if e["system"] == "Kiln" else None
        ratio = f"{e['tokens_per_s'] / peer['tokens_per_s']:.2f}" if peer else "-"
        lines.append(f"{head} {e['tokens_per_s']:,.0f} | {mfu} | {e['peak_mem_gib']:.1f} | {ratio} |")
    return lines


def dry_run() -> int:
    """Compose each row's Kiln config, check its shape against torchtitan's flavour, print both commands; 1 if a row
    fails."""
    bad = 0
    for row in ROWS:
        problem = compose(kiln_overrides(row, "/tmp/kiln-bench-gpu", "dry", row.end))
        flavor, shape = TITAN_FLAVORS[row.preset]
        if problem is None:
            cfg = kiln_config(row)
            if kiln_shape(cfg.model) != {**shape, **LLAMA3}:
                problem = f"its shape {kiln_shape(cfg.model)} is not torchtitan's {flavor} {shape}"
            print(f"llama {row.preset} Kiln: {problem or 'composes'} ({kiln_flops(cfg):.3g} FLOPs a token)")
        else:
            print(f"llama {row.preset} Kiln: {problem}")
        for version in (TITAN_LATEST, TITAN_OLDER):
            plan = titan_plan(row, row.end)
            inputs = ("WORK/titan-inputs/tokenizer", "WORK/titan-inputs/data")
            args = titan_args(plan, version, *inputs, f"WORK/titan-{row.preset}")
            print(f"  torchtitan {version}: torchrun --nproc-per-node 1 -m torchtitan.train {' '.join(args)}")
        bad += bool(problem)
    return 1 if bad else 0


# torchtitan 0.2.2 has no 1B flavour: its runs import this module (--experimental.custom-import) with this set.
if os.environ.get("KILN_TITAN_ADD_1B"):
    add_titan_1b()
