"""`kiln generate`, `kiln chat` and `kiln predict`, and how every inference command (`kiln eval` too, in
evaluate.py) finds its model: a run's checkpoint or an exported folder, handed to trainers/inference/
(loaded_model.py, chat.py and predict.py). Everything runs in this one process, on CPU."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console

from data_pipeline.redaction import redact_text
from orchestrator.cli.options import add_json, add_storage_root
from orchestrator.config import KilnConfig, UsageError

if TYPE_CHECKING:
    from trainers.inference.loaded_model import LoadedModel

DEFAULT_MAX_NEW_TOKENS = 32
TARGET_HELP = "a run id (its newest committed checkpoint, or --step) or a Hugging Face folder (kiln export)"
Result = TypeVar("Result")


@dataclass
class Source:
    """The model to use and where it came from."""

    loaded: LoadedModel  # its task: the run's, or the folder's from config.json
    label: str  # "run qs step 20" or "folder ./out"
    cfg: KilnConfig | None = None  # the run's config, when the model is a run's checkpoint
    run_id: str | None = None
    step: int | None = None
    world_size: int = 1  # how many workers trained the checkpoint (and evaluated at its step)


def add_generation_commands(sub, default_root: str) -> None:
    """`kiln generate` and `kiln chat`."""
    generate = sub.add_parser("generate", help="complete prompts with a run's checkpoint or an exported model")
    generate.add_argument("target", metavar="RUN|HF_DIR", help=TARGET_HELP)
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
    chat.add_argument("target", metavar="RUN|HF_DIR", help=TARGET_HELP)
    chat.add_argument("--step", type=int, default=None, help="a run's checkpoint step (default: newest)")
    add_sampling_arguments(chat, what="per reply")
    add_storage_root(chat, default_root)
    chat.set_defaults(func=cmd_chat)


def add_predict_command(sub, default_root: str) -> None:
    """`kiln predict`."""
    predict = sub.add_parser("predict", help="a classifier's label and class probabilities for each text")
    predict.add_argument("target", metavar="RUN|HF_DIR", help=TARGET_HELP)
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


def open_model(args: argparse.Namespace, merge: bool = True) -> Source:
    """The model args.target names: a Hugging Face folder, or a run's checkpoint (newest, or --step; a LoRA run's
    adapters merged into it unless merge is False)."""
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
        merge,
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


def user_error(call: Callable[[], Result]) -> Result:
    """call(), with trainers' InferenceError turned into the CLI's one-line UsageError."""
    from trainers.inference.loaded_model import InferenceError

    try:
        return call()
    except InferenceError as exc:
        raise UsageError(str(exc)) from None


def user_errors(items: Iterable[Result]) -> Iterator[Result]:
    """The items, with trainers' InferenceError raised while producing them turned into UsageError."""
    from trainers.inference.loaded_model import InferenceError

    try:
        yield from items
    except InferenceError as exc:
        raise UsageError(str(exc)) from None
