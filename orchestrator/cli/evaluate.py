"""`kiln eval`: a checkpoint's validation metrics (the run's own evaluation slice, or the val split of a prepared
dataset), BLEU/chrF of prompt/reference pairs, or a task=dpo run's reward accuracy and margins on a preference file.
The model is found as for `kiln generate` (inference.py); the metrics come from trainers/inference/loaded_model.py
(preference.py for preference files). Everything runs in this one process, on CPU."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console

from orchestrator.cli.inference import (
    DEFAULT_MAX_NEW_TOKENS,
    TARGET_HELP,
    Source,
    looks_like_folder,
    open_model,
    text_model,
    user_error,
)
from orchestrator.cli.options import add_json, add_storage_root
from orchestrator.config import KilnConfig, UsageError

if TYPE_CHECKING:
    from data_pipeline.dataset import Dataset
    from trainers.inference.loaded_model import Pair
    from trainers.tasks import Task

FOLDER_MICRO_BATCH = 8  # an exported folder has no run config: its default evaluation batch


def add_eval_command(sub, default_root: str) -> None:
    """`kiln eval`."""
    evaluate = sub.add_parser(
        "eval",
        help="a checkpoint's validation metrics (as its run logged them), or BLEU/chrF of prompt/reference pairs",
    )
    evaluate.add_argument("target", metavar="RUN|HF_DIR", help=TARGET_HELP)
    evaluate.add_argument("--step", type=int, default=None, help="a run's checkpoint step (default: newest)")
    evaluate.add_argument(
        "--data",
        default=None,
        help="a prepared dataset (its val split), a JSONL file of {prompt, reference} rows (BLEU, chrF), or for a "
        "task=dpo run a file of {prompt, chosen, rejected} pairs in any format `kiln prepare` reads (reward accuracy "
        "and margins); default: the run's own validation slice",
    )
    evaluate.add_argument(
        "--micro-batch", type=int, default=None, help="with --data DATASET or PAIRS: sequences (pairs) a batch"
    )
    evaluate.add_argument("--batches", type=int, default=None, help="with --data DATASET: batches to evaluate")
    evaluate.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"with --data FILE.jsonl: tokens generated (greedily) per prompt (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    add_json(evaluate)
    add_storage_root(evaluate, default_root)
    evaluate.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from trainers.inference.loaded_model import read_pairs
    from trainers.inference.preference import holds_preference_pairs, records_input

    data = args.data
    if data is not None and records_input(data) and holds_preference_pairs(data):
        result = eval_preferences(args, data)
    elif data is not None and (data.endswith(".jsonl") or os.path.isfile(data)):
        pairs = user_error(lambda: read_pairs(data))  # a bad file fails before the model loads
        result = eval_pairs(text_model(args, "eval --data PAIRS.jsonl"), data, pairs, args.max_new_tokens)
    else:
        result = eval_split(open_model(args), data, args.micro_batch, args.batches)
    if args.json:
        from orchestrator.run.lifecycle import dumps

        print(dumps(result))
        return 0
    console.print(f"{result['model']}: {result['what']}", markup=False, highlight=False)
    logged = result.get("logged") or {}
    for name, value in sorted(result["metrics"].items()):
        also = f"(logged at step {result['step']}: {logged[name]:.6g})" if name in logged else ""
        console.print(f"  {name:<22} {value:<12.6g} {also}".rstrip(), markup=False, highlight=False)
    for example in result.get("bad_examples", []):
        console.print(f"  skipped: {example}", markup=False, highlight=False)
    if result.get("note"):
        console.print(f"  note: {result['note']}", markup=False, highlight=False)
    return 0


@dataclass(frozen=True)
class EvalSlice:
    """Which validation sequences `kiln eval` reads: decided before any model runs."""

    world_size: int  # the run's workers, whose slices are evaluated in turn and summed
    micro_batch: int
    batches: int
    seed: int
    what: str  # the slice, in words


def plan_run_slice(cfg: KilnConfig, world_size: int, micro_batch: int | None, batches: int | None) -> EvalSlice:
    """The run's own evaluation slice, exactly as its workers read it."""
    if micro_batch is not None or batches is not None:
        raise UsageError(
            "--micro-batch/--batches choose a slice of --data; without --data kiln eval uses the run's own "
            "evaluation slice"
        )
    micro_batch, batches = cfg.train.micro_batch, cfg.train.eval_batches
    what = (
        f"validation slice of the run ({world_size} worker{'s' if world_size > 1 else ''} x {batches} "
        f"batches x {micro_batch} sequences, every worker's slice evaluated in turn and summed as the run did)"
    )
    return EvalSlice(world_size, micro_batch, batches, cfg.train.seed, what)


def plan_dataset_slice(
    data: str, available: int, cfg: KilnConfig | None, run_workers: int, micro_batch: int | None, batches: int | None
) -> EvalSlice:
    """The first batches of a prepared dataset's val split (`available` sequences): a run's amount, or all of it."""
    wanted = (micro_batch or 1) * (batches or 1)
    if batches is not None and wanted > available:
        raise UsageError(
            f"--batches {batches} x --micro-batch {micro_batch or 1} = {wanted} sequences, but the val split of "
            f"{data} has {available}; ask for fewer"
        )
    if micro_batch is None:
        micro_batch = cfg.train.micro_batch if cfg else min(FOLDER_MICRO_BATCH, max(available, 1))
    if batches is None:  # a run: as many sequences as its own evaluation read; a folder: the whole split
        batches = cfg.train.eval_batches * run_workers if cfg else max(available // micro_batch, 1)
    for name, value in (("--micro-batch", micro_batch), ("--batches", batches)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    what = f"val split of {data} (first {batches} batches x {micro_batch} sequences, of {available})"
    return EvalSlice(1, micro_batch, batches, cfg.train.seed if cfg else 0, what)


def eval_split(source: Source, data: str | None, micro_batch: int | None, batches: int | None) -> dict:
    """The task's validation metrics: the run's own evaluation slice, or the val split of a prepared dataset."""
    from trainers.inference.loaded_model import validation_metrics

    cfg = source.cfg
    plan, datasets, weights = eval_data(source, data, micro_batch, batches)
    task = dpo_task(source, data, plan.seed) if cfg is not None and cfg.task.name == "dpo" else None
    metrics = user_error(
        lambda: validation_metrics(
            task or source.loaded.build_task(plan.seed),
            source.loaded.model,
            datasets,
            weights,
            micro_batch=plan.micro_batch,
            batches=plan.batches,
            seed=plan.seed,
            world_size=plan.world_size,
        )
    )
    result = {
        "model": source.label,
        "run": source.run_id,
        "step": source.step,
        "data": data if data is not None else cfg.data.path if cfg else None,
        "split": "val",
        "world_size": plan.world_size,
        "micro_batch": plan.micro_batch,
        "batches": plan.batches,
        "sequences": plan.world_size * plan.micro_batch * plan.batches,
        "metrics": metrics,
        "what": plan.what,
    }
    if data is None and cfg is not None:
        result["logged"] = logged_metrics(cfg, source)
        if cfg.strategy.precision not in ("auto", "fp32"):
            result["note"] = (
                f"computed in fp32 on CPU; the run trained in {cfg.strategy.precision}, so its logged numbers "
                "carry that precision's rounding"
            )
    return result


def dpo_task(source: Source, data: str | None, seed: int) -> Task:
    """A task=dpo run's task, with the reference log-probs committed in the run: they cover the run's own pairs only."""
    from trainers.checkpoint import reference
    from trainers.tasks.dpo import DPO

    cfg = source.cfg
    assert cfg is not None
    if data is not None:
        raise UsageError(
            f"kiln eval --data {data} cannot score task=dpo run {source.run_id}: its reference log-probs were computed "
            "for the run's own pairs; leave --data out to score its validation pairs"
        )
    try:
        tables = reference.read_committed(reference.reference_url(cfg.run_url))
    except reference.ReferenceError as exc:
        raise UsageError(str(exc)) from None
    task = source.loaded.build_task(seed, dpo=cfg.dpo)
    if isinstance(task, DPO):
        task.attach_reference(tables)
    return task


def eval_data(
    source: Source, data: str | None, micro_batch: int | None, batches: int | None
) -> tuple[EvalSlice, list[Dataset], list[float] | None]:
    """The slice to evaluate and the datasets it is read from: the run's own data, or the prepared dataset given."""
    from data_pipeline.dataset import open_dataset, open_training_data
    from trainers.inference.loaded_model import check_vocabulary

    cfg = source.cfg
    if data is None:
        if cfg is None:
            raise UsageError(
                f"{source.label} has no validation split of its own: pass --data DATASET (a prepared dataset "
                "folder) or --data FILE.jsonl (prompt/reference pairs)"
            )
        plan = plan_run_slice(cfg, source.world_size, micro_batch, batches)
        datasets, weights = open_training_data(cfg.data.source, cfg.data.path, cfg.data.mixture)
        return plan, datasets, weights
    dataset = open_dataset(data)
    user_error(lambda: check_vocabulary(source.loaded, dataset))
    check_eval_data(source, data, dataset)
    available = sum(shard.sequences for shard in dataset.shards("val"))
    return plan_dataset_slice(data, available, cfg, source.world_size, micro_batch, batches), [dataset], None


def check_eval_data(source: Source, data: str, dataset: Dataset) -> None:
    """A prepared dataset the model can read: its sequence length, masks and class labels."""
    from trainers.task_data import check_task_data, data_labels

    context = source.loaded.context
    if context is not None and dataset.seq_len > context:
        raise UsageError(
            f"{data} holds {dataset.seq_len}-token sequences but {source.label} takes at most {context}: "
            f"prepare it again with seq_len={context} or less"
        )
    task = source.loaded.task
    check_task_data(task.name, [dataset], lambda _note: None)  # e.g. an SFT model on data without masks
    if task.name == "classification" and data_labels([dataset]) != task.labels:  # a class id means one label
        raise UsageError(
            f"{data} labels its classes {data_labels([dataset])} but {source.label} classifies into "
            f"{task.labels}: evaluate on data prepared with the same labels"
        )


def eval_pairs(source: Source, data: str, pairs: list[Pair], max_new_tokens: int) -> dict:
    """Greedy completions of each prompt, scored against the references with sacrebleu's BLEU and chrF. A chat
    (task=sft) model reads each prompt as a user message in its chat template, as it was trained."""
    from trainers.inference.loaded_model import Sampling, generate, text_metrics

    sampling = user_error(lambda: Sampling(max_new_tokens=max_new_tokens))
    chat = source.loaded.task.name == "sft" and bool(getattr(source.loaded.tokenizer, "chat_template", None))
    outputs = user_error(lambda: list(generate(source.loaded, (p.prompt for p in pairs), sampling, chat=chat)))
    return {
        "model": source.label,
        "run": source.run_id,
        "step": source.step,
        "data": data,
        "examples": len(pairs),
        "max_new_tokens": max_new_tokens,
        "metrics": text_metrics(outputs, [p.reference for p in pairs]),
        "what": f"{len(pairs)} prompts of {data}{' in the chat template' if chat else ''}, greedy, up to "
        f"{max_new_tokens} new tokens each (sacrebleu)",
    }


def eval_preferences(args: argparse.Namespace, data: str) -> dict:
    """A task=dpo run's loss, rewards/* and logps/* on the pairs of a preference file: each record encoded as `kiln
    prepare kind=preference` would with the run's tokenizer and data.seq_len, the checkpoint scored against the
    run's initial model. Refusals (a run of another task, a bad file) come before any model loads."""
    from data_pipeline import storage
    from data_pipeline import tokenizer as bpe
    from trainers.inference.preference import initial_model, pair_batches, preference_metrics, read_preferences
    from trainers.run.folder import TOKENIZER_DIR
    from trainers.tasks.dpo import DPO

    if args.batches is not None:
        raise UsageError(f"--batches picks batches of a prepared dataset; kiln eval scores every pair of {data}")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise UsageError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    cfg, run_url = dpo_run(args, data)
    seq_len = cfg.data.seq_len
    read = user_error(lambda: read_preferences(data, bpe.load(storage.join(run_url, TOKENIZER_DIR)), seq_len))
    source = open_model(args, merge=False)  # LoRA unmerged: its reference is the same model with the adapters off
    loaded = source.loaded
    reference = initial_model(loaded, cfg.model)
    task = loaded.build_task(cfg.train.seed, dpo=cfg.dpo)
    assert isinstance(task, DPO)
    micro_batch = args.micro_batch or cfg.train.micro_batch
    batches = pair_batches(read.pairs, seq_len, loaded.pad_id, micro_batch)
    metrics = preference_metrics(task, loaded.model, reference, batches)
    against = "its LoRA adapters off" if reference is loaded.model else str(cfg.model.init_from)
    dpo = cfg.dpo
    smoothing = f", label_smoothing={dpo.label_smoothing:g}" if dpo.label_smoothing else ""
    result = {
        "model": source.label,
        "run": source.run_id,
        "step": source.step,
        "data": data,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "metrics": {**metrics, **read.counts()},
        "bad_examples": read.bad_examples,
        "what": f"{len(read.pairs)} preference pairs of {data} (seq_len={seq_len}, {micro_batch} a batch), the "
        f"checkpoint against the run's initial model ({against}); dpo.loss={dpo.loss}, beta={dpo.beta:g}{smoothing}",
    }
    if cfg.strategy.precision not in ("auto", "fp32"):
        result["note"] = f"computed in fp32 on CPU; the run trained in {cfg.strategy.precision}"
    return result


def dpo_run(args: argparse.Namespace, data: str) -> tuple[KilnConfig, str]:
    """The config and folder of the task=dpo run args.target names: a preference file is scored against the model
    the run started from, so a folder or a run of another task is refused, saying what its --data takes."""
    from orchestrator.config import absolute_url
    from orchestrator.run.lifecycle import reopen_run
    from trainers.task_data import GENERATIVE_TASKS

    holds = f"{data} holds preference pairs (chosen, rejected), scored against the model a task=dpo run started from"
    if looks_like_folder(args.target):
        raise UsageError(f"{holds}: give that run's id, not the folder {args.target} (an exported model has none)")
    registry, _record, cfg = reopen_run(absolute_url(args.storage_root), args.target, [])
    task = cfg.task.name
    if task != "dpo":
        takes = 'a JSONL file of {"prompt", "reference"} rows (BLEU, chrF) or ' if task in GENERATIVE_TASKS else ""
        raise UsageError(
            f"{holds}, but run {args.target} is a task={task} run: its --data takes {takes}a prepared dataset "
            "(its val split)"
        )
    return cfg, registry.run_url(args.target)


def logged_metrics(cfg: KilnConfig, source: Source) -> dict[str, float] | None:
    """The val/* metrics the run logged at the checkpoint's step (the last such line), if it evaluated there."""
    from orchestrator.run.registry import RunRegistry

    logged = None
    for row in RunRegistry(cfg.storage.root).metrics(str(source.run_id)):
        if row.get("step") == source.step and any(k.startswith("val/") for k in row):
            logged = {k: v for k, v in row.items() if k.startswith("val/")}
    return logged
