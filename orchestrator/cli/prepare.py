"""`kiln prepare key=value ...`: parse settings, show progress, print the summary."""

from __future__ import annotations

import difflib
from dataclasses import fields

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from data_pipeline.prepare import PrepareConfig, PrepareError, prepare
from data_pipeline.redaction import URL_CREDENTIALS, redact_text
from orchestrator.config import UsageError


def parse(overrides: list[str]) -> PrepareConfig:
    """PrepareConfig from key=value words; unknown keys and bad values fail naming the key."""
    known = [f.name for f in fields(PrepareConfig)]
    for word in overrides:
        key = word.split("=", 1)[0]
        if "=" not in word:
            raise UsageError(f"could not parse '{redact_text(word)}': write key=value (e.g. input=data/*.jsonl)")
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise UsageError(
                f"unknown prepare key '{key}'"
                + (f"; did you mean {hint[0]}?" if hint else "")
                + f" (keys: {', '.join(known)})"
            )
        if URL_CREDENTIALS.search(word.split("=", 1)[1]):  # before any value can be echoed or reach storage
            raise UsageError(
                f"{key} has credentials written into its URL; Kiln takes them only from the "
                "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE): write the URL "
                "without user:password@"
            )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PrepareConfig), OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "value"
        raise UsageError(f"{key}: {str(exc).splitlines()[0]}") from None
    except PrepareError as exc:
        raise UsageError(str(exc)) from None
    assert isinstance(cfg, PrepareConfig)
    return cfg


def run(overrides: list[str], console: Console) -> int:
    """Prepare a dataset with a live documents/tokens counter; returns the exit code."""
    cfg = parse(overrides)
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[docs]:,} documents"),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("prepare", total=None, docs=0, tokens=0)
        summary = prepare(
            cfg, log=console.print, progress=lambda docs, tokens: bar.update(task, docs=docs, tokens=tokens)
        )
    verb = "reused" if summary.reused else "prepared"
    console.print(
        f"{verb} {summary.output}: {summary.documents:,} documents, {summary.tokens:,} tokens, "
        f"{summary.shards} shards, {summary.bad_records} bad records, {summary.empty_documents} empty "
        f"documents dropped, {summary.wall_s:.1f}s ({summary.tokens_per_s:,.0f} tokens/s)"
    )
    if cfg.kind == "chat":
        console.print(
            f"  one conversation per row of seq_len={cfg.seq_len}: {summary.truncated} longer ones cut there, "
            f"{summary.dropped} dropped (overflow={cfg.overflow})"
        )
    if cfg.kind == "preference":
        console.print(
            f"  one pair per example, its chosen then its rejected row of seq_len={cfg.seq_len}: "
            f"{summary.truncated} with an answer cut there, {summary.dropped} dropped (prompt fills seq_len"
            f"{', or overflow=drop' if cfg.overflow == 'drop' else ''}), {summary.identical} identical once cut, "
            f"{summary.prompt_mismatch} with a prompt that tokenizes differently alone"
        )
    for example in summary.bad_examples:
        console.print(f"  skipped: {example}")
    if cfg.kind == "pretrain":
        console.print(f"train on it:  kiln train data=prepared data.path={summary.output} data.seq_len={cfg.seq_len}")
    return 0
