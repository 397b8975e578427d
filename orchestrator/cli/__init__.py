"""The `kiln` command: train, submit, prepare, runs, status, logs, resume, stop, export, eval, generate, chat."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from data_pipeline.config import DEFAULT_STORAGE_ROOT, STORAGE_ROOT_ENV, default_storage_root
from orchestrator.cli.options import STORAGE_ROOT, add_address, add_json, add_storage_root
from orchestrator.cli.status import cmd_runs, cmd_status
from trainers.run.folder import TOKENIZER_DIR
from trainers.run.state import RunState, is_terminal

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_PREEMPTED = 3  # stopped early with a committed checkpoint; `kiln resume RUN` continues it
EXIT_INTERRUPTED = 130
DEBUG_ENV = "KILN_DEBUG"  # set to 1 to see the (redacted) traceback of an unexpected error


class RedactingConsole(Console):
    """A rich Console that passes every printed string through the one redaction (secrets, URL credentials)."""

    def print(self, *objects, **kwargs) -> None:
        from data_pipeline.redaction import redact_text

        super().print(*(redact_text(o) if isinstance(o, str) else o for o in objects), **kwargs)


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.config import compose_config, config_keys, group_names

    if args.list_keys:
        from orchestrator.sweep.settings import sweep_keys

        console.print("groups: " + ", ".join(group_names()))
        for key in config_keys():
            console.print(f"  {key}")
        console.print("sweep settings (kiln sweep, kiln train -m):")
        for key in sweep_keys():
            console.print(f"  {key}")
        return 0
    cfg = compose_config(args.overrides)  # bad input fails here, before Ray starts
    from orchestrator.launch.ray_train import train
    from orchestrator.run.planning import start_run

    plan, registry, record = start_run(cfg, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    return print_outcome(train(plan, console, (registry, record), "kiln train"), console)


def print_outcome(outcome, console: Console) -> int:
    """The end-of-run summary; returns the exit code."""
    color = "yellow" if outcome.state == RunState.PREEMPTED else "green"
    console.print(
        f"[{color}]{outcome.state}[/{color}] run {outcome.run_id}: step {outcome.step} in {outcome.wall_s:.0f}s"
    )
    if outcome.first_val_ppl is not None and outcome.last_val_ppl is not None:
        console.print(
            f"validation perplexity: {outcome.first_val_ppl:,.1f} at step 0 -> "
            f"{outcome.last_val_ppl:,.1f} at step {outcome.step}"
        )
    if outcome.checkpoint:
        console.print(f"checkpoint: {outcome.checkpoint['uri']}")
    console.print(f"run folder: {outcome.run_dir} (metrics.jsonl, config.yaml, logs/, wandb/)")
    root = outcome.run_dir[: -len(outcome.run_id)].rstrip("/")
    console.print(f"inspect:    kiln status {outcome.run_id} --storage-root {root}")
    if outcome.state == RunState.PREEMPTED:
        from orchestrator.run.lifecycle import resume_command

        console.print(f"resume:     {resume_command(outcome.run_id, root, outcome.cluster_address)}")
        return EXIT_PREEMPTED
    return 0


def cmd_resume(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.config import absolute_url
    from orchestrator.launch.ray_train import train
    from orchestrator.run.planning import plan_resume

    root, overrides = resume_root(args.storage_root, args.overrides)
    if args.address:
        from orchestrator.cli.cluster import resubmit

        return resubmit(args, console, absolute_url(root), overrides)
    plan, registry, record = plan_resume(absolute_url(root), args.run, overrides, args.force)
    console.print(f"resuming {record.run_id} ({record.state} at step {record.step}) from its last committed checkpoint")
    return print_outcome(train(plan, console, (registry, record), "kiln resume"), console)


def cmd_start(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.cli.cluster import never_started
    from orchestrator.config import absolute_url
    from orchestrator.launch.ray_train import train
    from orchestrator.run.lifecycle import ready_registered
    from orchestrator.run.planning import plan_start
    from orchestrator.run.registry import RunRegistry

    root = absolute_url(args.storage_root)
    try:
        with plan_start(root, args.run, args.overrides, log=lambda m: console.print(f"[dim]{m}[/dim]")) as started:
            plan, record = started
            registry = ready_registered(plan, record)
    except Exception as exc:
        never_started(RunRegistry(root), args.run, exc)
        raise
    return print_outcome(train(plan, console, (registry, record), "kiln start"), console)


def resume_root(storage_root: str | None, overrides: list[str]) -> tuple[str, list[str]]:
    """Where to find the run: `storage.root=` among the overrides means the same as --storage-root."""
    from orchestrator.config import UsageError

    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("storage.root=")]
    rest = [o for o in overrides if not o.lstrip("+").startswith("storage.root=")]
    if not given:
        return storage_root or default_storage_root(), rest
    if storage_root and storage_root != given[-1]:
        raise UsageError(
            f"storage.root={given[-1]} and --storage-root {storage_root} disagree; the run is "
            "looked up where it lives: give one of them"
        )
    return given[-1], rest


def cmd_stop(args: argparse.Namespace, console: Console) -> int:
    import time

    from orchestrator.config import UsageError, absolute_url
    from orchestrator.run.lifecycle import resume_command
    from orchestrator.run.liveness import DriverIdentity
    from orchestrator.run.registry import RunRegistry
    from trainers.run.stop_request import ask_to_stop

    registry = RunRegistry(absolute_url(args.storage_root))
    record = registry.load(args.run)
    if is_terminal(record.state):
        raise UsageError(f"run {args.run} is {record.state}, not running; nothing to stop")
    if args.now:
        from orchestrator.cli.cluster import stop_now

        return stop_now(registry, record, console)
    who = DriverIdentity.here("kiln stop")
    reason = f"stop requested by `kiln stop` ({who.who})"
    ask_to_stop(registry.run_url(args.run), reason, driver=who.event_json())
    console.print(
        f"asked run {args.run} to commit a checkpoint and stop; it will end PREEMPTED "
        f"(resume: {resume_command(args.run, registry.root, record.cluster_address)})"
    )
    deadline = time.monotonic() + args.wait
    while args.wait and time.monotonic() < deadline:
        record = registry.load(args.run)
        if is_terminal(record.state):
            console.print(f"run {args.run} is {record.state} at step {record.step}")
            return 0
        time.sleep(2)
    if args.wait:
        console.print(f"run {args.run} is still {record.state} after {args.wait:.0f}s")
        return EXIT_FAILED
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from data_pipeline import storage
    from data_pipeline.staging import replace_folder
    from orchestrator.config import UsageError
    from orchestrator.run.lifecycle import find_checkpoint, reopen_run
    from trainers.export import export_adapter, export_checkpoint

    registry, _record, cfg = reopen_run(args.storage_root, args.run, [])
    if args.adapter and not cfg.model.lora.enabled:
        raise UsageError(
            f"kiln export {args.run} --adapter: run {args.run} trained no LoRA adapters (model.lora.r unset); "
            "export the whole model without --adapter"
        )
    checkpoint = find_checkpoint(registry, cfg, args.step)
    tokenizer_url = storage.join(registry.run_url(args.run), TOKENIZER_DIR)
    strategy = checkpoint.manifest["strategy"]

    def write(staging: str) -> list[str]:
        if args.adapter:
            return export_adapter(cfg.task, cfg.model, checkpoint.url, strategy, tokenizer_url, staging)
        return export_checkpoint(
            cfg.task, cfg.model, checkpoint.url, strategy, tokenizer_url, staging, seq_len=cfg.data.seq_len
        )

    # Built beside --out and swapped in whole: stale weights of an earlier export never survive beside new ones.
    files = replace_folder(args.out, write, overwrite=args.overwrite)
    console.print(
        f"exported {args.run} step {checkpoint.step} ({checkpoint.manifest['strategy']}, "
        f"{checkpoint.manifest['world_size']} workers) -> {args.out}: {', '.join(files)}"
    )
    return 0


def cmd_prepare(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.cli import prepare

    return prepare.run(args.overrides, console)


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    top = argparse.ArgumentParser(prog="kiln", description="Fault-tolerant LLM training on Ray.")
    sub = top.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a Hydra config: kiln train experiment=quickstart key=value ...")
    train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.max_steps=100 strategy=ddp")
    train.add_argument("--list-keys", action="store_true", help="print config groups and every key, then exit")
    train.add_argument(
        "-m", "--multirun", action="store_true", help="sweep: the same as `kiln sweep OVERRIDES` (Hydra's spelling)"
    )
    train.set_defaults(func=cmd_train)
    runs = sub.add_parser("runs", help="list runs")
    add_storage_root(runs, default_storage_root())
    runs.set_defaults(func=cmd_runs)
    status = sub.add_parser("status", help="show one run")
    status.add_argument("run")
    add_json(status)
    add_storage_root(status, default_storage_root())
    status.set_defaults(func=cmd_status)
    resume = sub.add_parser(
        "resume",
        help="continue a run from its last committed checkpoint: kiln resume RUN "
        "[cluster.num_workers=N] [train.max_steps=N]",
    )
    resume.add_argument("run")
    resume.add_argument("overrides", nargs="*", help="resume-safe overrides only (e.g. cluster.num_workers=4)")
    add_storage_root(resume, None, help=f"where the run lives (default: ${STORAGE_ROOT_ENV} or {DEFAULT_STORAGE_ROOT})")
    resume.add_argument("--force", action="store_true", help="resume even if the run looks alive")
    add_address(resume, "resubmit it as a Ray job to this cluster (the Jobs API, http://HEAD:8265)")
    resume.add_argument("--follow", action="store_true", help="with --address: stream the driver's log to the end")
    resume.add_argument("--working-dir", default=None, help="with --address: ship this Kiln checkout with the job")
    resume.set_defaults(func=cmd_resume)
    stop = sub.add_parser("stop", help="ask a running run to commit a checkpoint and stop (PREEMPTED)")
    stop.add_argument("run")
    add_storage_root(stop, default_storage_root())
    stop.add_argument("--wait", type=float, default=0, help="seconds to wait for it to stop (default: return now)")
    stop.add_argument(
        "--now", action="store_true", help="a submitted run: stop its Ray job at once, without a final checkpoint"
    )
    stop.set_defaults(func=cmd_stop)
    add_cluster_commands(sub)
    from orchestrator.cli.sweep import add_sweep_commands

    add_sweep_commands(sub, default_storage_root())
    export = sub.add_parser("export", help="write a Hugging Face folder from a run's checkpoint")
    export.add_argument("run")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest committed)")
    export.add_argument("--out", required=True, help="output folder (new or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder whole")
    export.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run: write the adapters alone (peft's adapter_config.json + adapter_model.safetensors), "
        "not the merged model",
    )
    add_storage_root(export, default_storage_root())
    export.set_defaults(func=cmd_export)
    from orchestrator.cli.evaluate import add_eval_command
    from orchestrator.cli.inference import add_generation_commands, add_predict_command
    from orchestrator.cli.report import add_report_commands

    add_generation_commands(sub, default_storage_root())  # generate, chat
    add_eval_command(sub, default_storage_root())
    add_predict_command(sub, default_storage_root())
    add_report_commands(sub, default_storage_root())
    prep = sub.add_parser(
        "prepare", help="tokenize raw files into a prepared dataset: kiln prepare input=... output=..."
    )
    prep.add_argument(
        "overrides",
        nargs="*",
        help="input=URI_OR_GLOB output=URI [format=] [text_field=] [tokenizer=] "
        "[vocab_size=] [seq_len=] [val_fraction=] [on_bad_record=] [kind=]",
    )
    prep.set_defaults(func=cmd_prepare)
    sub.metavar = "{" + ",".join(name for name in sub.choices if not name.startswith("sweep-")) + "}"
    return top


def add_cluster_commands(sub) -> None:
    """`kiln submit`, `kiln start` and `kiln logs`: runs driven by a Ray job on a cluster."""
    from orchestrator.cli.cluster import cmd_logs, cmd_submit

    submit = sub.add_parser(
        "submit", help="run a training job on a Ray cluster as a Ray job: kiln submit --address URL key=value ..."
    )
    submit.add_argument("overrides", nargs="*", help="Hydra overrides, as for kiln train")
    add_address(submit, "the cluster's Jobs API, http://HEAD:8265 (else $RAY_ADDRESS, else cluster.address)")
    submit.add_argument("--follow", action="store_true", help="stream the driver's log; exit with the run's exit code")
    submit.add_argument(
        "--working-dir", default=None, help="ship this Kiln checkout with the job (default: the Kiln in the image)"
    )
    submit.set_defaults(func=cmd_submit)
    start = sub.add_parser("start", help="start a registered (PENDING) run here: what a submitted Ray job runs")
    start.add_argument("run")
    start.add_argument("overrides", nargs="*", help="resume-safe overrides only (e.g. cluster.address=auto)")
    add_storage_root(start, default_storage_root())
    start.set_defaults(func=cmd_start)
    logs = sub.add_parser("logs", help="a run's driver log (a submitted run's, from Ray Jobs) or a worker's log")
    logs.add_argument("run")
    logs.add_argument("--rank", type=int, default=None, help="this worker's log, from the run folder")
    logs.add_argument("--follow", action="store_true", help="keep printing until the run ends")
    add_storage_root(logs, default_storage_root())
    logs.set_defaults(func=cmd_logs)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit 2, failed runs exit 1."""
    from orchestrator.cli.sweep import sweep_argv

    errors = usage_errors()
    args = parser().parse_args(sweep_argv(sys.argv[1:] if argv is None else argv))
    args.command = args.command.replace("sweep-", "sweep ")
    console = RedactingConsole(soft_wrap=True)
    if not console.is_terminal:  # piped or captured: never truncate ids and paths to 80 columns
        console = RedactingConsole(soft_wrap=True, width=240)
    try:
        check_no_credentials(args)
        return args.func(args, console)
    except errors as exc:
        say(f"kiln {args.command}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        say(f"kiln {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        return failed(args.command, exc)


def usage_errors() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix: kiln prints them on one line and exits 2."""
    from data_pipeline.config import DataConfigError
    from data_pipeline.dataset import DatasetError
    from data_pipeline.prepare import PrepareError
    from data_pipeline.sources import SourceError
    from data_pipeline.staging import OutputExists
    from data_pipeline.storage import StorageError
    from orchestrator.config import UsageError
    from orchestrator.run.registry import DamagedRun, RunExists, UnknownRun
    from orchestrator.sweep.record import DamagedSweep, UnknownSweep
    from trainers.errors import CheckpointError
    from trainers.pretrained import PretrainedError

    runs = (UnknownRun, RunExists, DamagedRun, UnknownSweep, DamagedSweep, CheckpointError, PretrainedError)
    data = (DataConfigError, DatasetError, SourceError, PrepareError, StorageError, OutputExists)
    return (UsageError, *runs, *data)


def failed(command: str, exc: Exception) -> int:
    """A run that failed exits 1 with its one line; anything else unexpected is said on one redacted line too."""
    from orchestrator.launch.ray_train import RunFailed

    if isinstance(exc, RunFailed):
        say(f"kiln {command}: {exc}")
        return EXIT_FAILED
    # Never a bare traceback (it may quote a URL with credentials): one redacted line, details on demand.
    if os.environ.get(DEBUG_ENV) == "1":
        import traceback

        say("".join(traceback.format_exception(exc)), one_line=False)
    say(
        f"kiln {command}: unexpected error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the "
        "traceback, and please report it)"
    )
    return EXIT_FAILED


def check_no_credentials(args: argparse.Namespace) -> None:
    """--storage-root and $KILN_STORAGE_ROOT take URLs without user:password@ (credentials come from the env)."""
    from data_pipeline.redaction import URL_CREDENTIALS
    from orchestrator.config import UsageError

    for name, value in (
        (STORAGE_ROOT, getattr(args, "storage_root", None)),
        (STORAGE_ROOT_ENV, os.environ.get(STORAGE_ROOT_ENV)),
    ):
        if value and URL_CREDENTIALS.search(value):
            raise UsageError(
                f"{name} has credentials written into its URL; Kiln takes them only from the "
                "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE): write the URL "
                "without user:password@"
            )


def say(message: str, one_line: bool = True) -> None:
    """Print to stderr through the redaction; one line unless told otherwise."""
    from data_pipeline.redaction import redact_text

    text = redact_text(str(message))
    if one_line:
        text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    print(text, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
