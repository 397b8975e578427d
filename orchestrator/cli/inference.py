"""`kiln eval`, `kiln generate`, `kiln chat` and `kiln predict`: find the model (a run's checkpoint or an exported
folder) and the data, then hand them to trainers/inference/ (loaded_model.py, chat.py and predict.py).
Everything runs in this one process, on CPU."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from data_pipeline.redaction import redact_text
from orchestrator.cli.options import add_json, add_storage_root
from orchestrator.config import KilnConfig, UsageError

DEFAULT_MAX_NEW_TOKENS = 32
FOLDER_MICRO_BATCH = 8  # an exported folder has no run config: its default evaluation batch


@dataclass
class Source:
    """The model to use and where it came from."""

    loaded: Any  # trainers.inference.loaded_model.LoadedModel (its task: the run's, or the folder's from config.json)
    label: str  # "run qs step 20" or "folder ./out"
    cfg: KilnConfig | None = None  # the run's config, when the model is a run's checkpoint
    run_id: str | None = None
    step: int | None = None
    world_size: int = 1  # how many workers trained the checkpoint (and evaluated at its step)


def add_inference_commands(sub, default_root: str) -> None:
    """`kiln eval`, `kiln generate`, `kiln chat` and `kiln predict`."""
    target_help = "a run id (its newest committed checkpoint, or --step) or a Hugging Face folder (kiln export)"
    generate = sub.add_parser("generate", help="complete prompts with a run's checkpoint or an exported model")
    generate.add_argument("target", metavar="RUN|HF_DIR", help=target_help)
    generate.add_argument("--prompt", required=True, help="the prompt; '-' reads prompts from stdin, one a line")
    add_sampling_arguments(generate)
    add_json(generate, 'one {"prompt", "completion"} object a line')
    generate.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user's message to a chat (SFT) model: its reply, in the chat template",
    )
    generate.add_argument("--step", type=int, default=None, help="a run's checkpoint step (default: newest)")
    add_storage_root(generate, default_root)
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="talk to a chat (task=sft) model; piped stdin: one user turn a line, one reply a line",
        description="Type a message and Enter; /reset clears the history, /exit or Ctrl-D ends.",
    )
    chat.add_argument("target", metavar="RUN|HF_DIR", help=target_help)
    chat.add_argument("--step", type=int, default=None, help="a run's checkpoint step (default: newest)")
    add_sampling_arguments(chat, what="per reply")
    add_storage_root(chat, default_root)
    chat.set_defaults(func=cmd_chat)

    evaluate = sub.add_parser(
        "eval",
        help="a checkpoint's validation metrics (as its run logged them), or BLEU/chrF of prompt/reference pairs",
    )
    evaluate.add_argument("target", metavar="RUN|HF_DIR", help=target_help)
    evaluate.add_argument("--step", type=int, default=None, help="a run's checkpoint step (default: newest)")
    evaluate.add_argument(
        "--data",
        default=None,
        help="a prepared dataset (its val split) or a JSONL file of {prompt, reference} rows (BLEU, chrF); "
        "default: the run's own validation slice",
    )
    evaluate.add_argument("--micro-batch", type=int, default=None, help="with --data DATASET: sequences a batch")
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

    predict = sub.add_parser("predict", help="a classifier's label and class probabilities for each text")
    predict.add_argument("target", metavar="RUN|HF_DIR", help=target_help)
    predict.add_argument(
        "--text", required=True, action="append", help="a text to classify (repeatable); '-' reads stdin, one a line"
    )
    predict.add_argument("--step", type=int, default=None, help="a run's checkpoint step (default: newest)")
    add_json(predict, 'one {"text", "label", "probabilities"} object a line')
    add_storage_root(predict, default_root)
    predict.set_defaults(func=cmd_predict)


def add_sampling_arguments(parser: argparse.ArgumentParser, what: str = "per prompt") -> None:
    """Decoding settings: greedy unless --temperature > 0, --top-k or --top-p."""
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"tokens to generate {what} (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set holding this mass")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (each prompt from it)")


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    from trainers.inference.loaded_model import Sampling, generate

    sampling = user_error(lambda: Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed))
    source = text_model(args, "generate")
    read: list[str] = []  # generate reads one prompt per completion: read[-1] is the current one

    def prompts() -> Iterator[str]:
        for prompt in stdin_prompts() if args.prompt == "-" else [args.prompt]:
            read.append(prompt)
            yield prompt

    for completion in user_errors(generate(source.loaded, prompts(), sampling, note=note, chat=args.chat)):
        if args.json:
            write_line(json.dumps({"prompt": read[-1], "completion": completion}, ensure_ascii=False))
        elif args.prompt == "-":  # one line per prompt: newlines inside a completion written as \\n
            write_line(completion.replace("\\", "\\\\").replace("\n", "\\n"))
        else:
            write_line(completion)
    return 0


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    """Each text's label (and, with --json, every class's probability), one line a text."""
    from trainers.inference.predict import classifier, predict

    source = open_model(args)
    user_error(lambda: classifier(source.loaded))  # not a classifier: said before stdin is read
    # a run's rows are its data's length; a folder's: the length its export recorded, else its context
    seq_len = source.cfg.data.seq_len if source.cfg is not None else source.loaded.seq_len or source.loaded.context
    if seq_len is None:
        raise UsageError(f"{source.label} does not say how many positions it takes (no max_position_embeddings)")

    def texts() -> Iterator[str]:
        for text in args.text:
            yield from stdin_prompts() if text == "-" else [text]

    for prediction in user_errors(predict(source.loaded, texts(), seq_len)):
        if args.json:
            write_line(json.dumps(prediction.as_json(), ensure_ascii=False))
        else:
            best = prediction.probabilities[prediction.label]
            write_line(f"{prediction.label}\t{best:.4f}")
    return 0


def cmd_chat(args: argparse.Namespace, console: Console) -> int:
    """A conversation on the terminal; with piped stdin, one user turn a line and one reply a line."""
    from trainers.inference.chat import ChatSession
    from trainers.inference.loaded_model import Sampling

    sampling = user_error(lambda: Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed))
    source = text_model(args, "chat")
    session = user_error(lambda: ChatSession(source.loaded, sampling, note=note))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {source.label}: /reset clears the history, /exit or Ctrl-D ends", file=sys.stderr)

    def write(text: str) -> None:  # piped: a reply stays on one line, its newlines written as \\n
        if not interactive:
            text = text.replace("\\", "\\\\").replace("\n", "\\n")
        sys.stdout.write(redact_text(text))
        sys.stdout.flush()

    for line in chat_turns(interactive):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            note("history cleared")
            continue
        if text.startswith("/") and " " not in text:
            note(f"unknown command {text}: /reset clears the history, /exit ends")
            continue
        try:  # piped: a line for every turn, empty when the turn could not be answered (said on stderr)
            if session.reply(text, write) is not None or not interactive:
                write_line("")
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the conversation goes on without it
            write_line("")
            note("reply interrupted; it is not kept in the history")
    return 0


def chat_turns(interactive: bool) -> Iterator[str]:
    """The user's messages: typed at a prompt (Ctrl-D or Ctrl-C there ends), or stdin's lines as they come."""
    if not interactive:
        yield from stdin_prompts()
        return
    while True:
        try:
            yield input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from trainers.inference.loaded_model import read_pairs

    data = args.data
    if data is not None and (data.endswith(".jsonl") or os.path.isfile(data)):
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
    from data_pipeline.dataset import open_dataset, open_training_data
    from trainers.inference.loaded_model import check_vocabulary, validation_metrics

    cfg = source.cfg
    if data is None:
        if cfg is None:
            raise UsageError(
                f"{source.label} has no validation split of its own: pass --data DATASET (a prepared dataset "
                "folder) or --data FILE.jsonl (prompt/reference pairs)"
            )
        plan = plan_run_slice(cfg, source.world_size, micro_batch, batches)
        datasets, weights = open_training_data(cfg.data.source, cfg.data.path, cfg.data.mixture)
    else:
        dataset = open_dataset(data)
        user_error(lambda: check_vocabulary(source.loaded, dataset))
        check_eval_data(source, data, dataset)
        available = sum(shard.sequences for shard in dataset.shards("val"))
        plan = plan_dataset_slice(data, available, cfg, source.world_size, micro_batch, batches)
        datasets, weights = [dataset], None
    metrics = user_error(
        lambda: validation_metrics(
            source.loaded.build_task(plan.seed),
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


def check_eval_data(source: Source, data: str, dataset: Any) -> None:
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


def eval_pairs(source: Source, data: str, pairs: list, max_new_tokens: int) -> dict:
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


def open_model(args: argparse.Namespace) -> Source:
    """The model args.target names: a Hugging Face folder, or a run's checkpoint (newest, or --step)."""
    from data_pipeline import storage
    from orchestrator.config import absolute_url
    from orchestrator.run.lifecycle import find_checkpoint, reopen_run
    from trainers.inference.loaded_model import load_checkpoint, load_folder
    from trainers.run.folder import TOKENIZER_DIR

    target = args.target
    if looks_like_folder(target):
        if args.step is not None:
            raise UsageError(
                f"--step picks a run's checkpoint, but {target} is a folder: export that step "
                "(kiln export RUN --step N --out DIR) or pass the run id"
            )
        return Source(user_error(lambda: load_folder(target)), f"folder {target}")
    registry, _record, cfg = reopen_run(absolute_url(args.storage_root), target, [])
    checkpoint = find_checkpoint(registry, cfg, args.step)
    strategy, world_size = checkpoint.manifest["strategy"], int(checkpoint.manifest["world_size"])
    loaded = load_checkpoint(
        cfg.task,
        cfg.model,
        checkpoint.url,
        strategy,
        storage.join(registry.run_url(target), TOKENIZER_DIR),
    )
    loaded.name = f"run {target} step {checkpoint.step}"
    label = f"run {target} step {checkpoint.step} ({strategy}, {world_size} worker{'s' if world_size > 1 else ''})"
    return Source(loaded, label, cfg, target, checkpoint.step, world_size)


def text_model(args: argparse.Namespace, command: str) -> Source:
    """open_model's model, refused in one line unless it is a causal LM (only those generate text)."""
    from trainers.task_data import GENERATIVE_TASKS

    source = open_model(args)
    task = source.loaded.task.name
    if task not in GENERATIVE_TASKS:
        raise UsageError(
            f"kiln {command} is for causal LMs (task={'|'.join(GENERATIVE_TASKS)}), but {source.label} is a "
            f"task={task} model: score it with `kiln eval {args.target}`"
        )
    return source


def looks_like_folder(target: str) -> bool:
    """A path (it exists, or is spelled like one), not a run id."""
    return os.path.exists(target) or os.sep in target or target.startswith((".", "~"))


def logged_metrics(cfg: KilnConfig, source: Source) -> dict[str, float] | None:
    """The val/* metrics the run logged at the checkpoint's step (the last such line), if it evaluated there."""
    from orchestrator.run.registry import RunRegistry

    logged = None
    for row in RunRegistry(cfg.storage.root).metrics(str(source.run_id)):
        if row.get("step") == source.step and any(k.startswith("val/") for k in row):
            logged = {k: v for k, v in row.items() if k.startswith("val/")}
    return logged


def stdin_prompts() -> Iterator[str]:
    """One prompt a line from stdin (the newline stripped), read as they come."""
    for line in sys.stdin:
        yield line.rstrip("\r\n")


def write_line(text: str) -> None:
    """A line of model output on stdout, through the one redaction (never rich markup or wrapping)."""
    sys.stdout.write(redact_text(text) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    """A remark about the input, on stderr, so that stdout holds only completions."""
    print(redact_text(f"note: {message}"), file=sys.stderr)


def user_error(call: Callable[[], Any]) -> Any:
    """call(), with trainers' InferenceError turned into the CLI's one-line UsageError."""
    from trainers.inference.loaded_model import InferenceError

    try:
        return call()
    except InferenceError as exc:
        raise UsageError(str(exc)) from None


def user_errors(items: Iterable[Any]) -> Iterator[Any]:
    """The items, with trainers' InferenceError raised while producing them turned into UsageError."""
    from trainers.inference.loaded_model import InferenceError

    try:
        yield from items
    except InferenceError as exc:
        raise UsageError(str(exc)) from None
