"""`model.init_from` on the driver: checked against the run's data before any worker starts.

The planner (orchestrator/run/plan.py) finds a `run:` source and reads the data's tokenizer; this module checks
what it is given, and calls nothing back. Either kind of source ends as a local Hugging Face folder: a folder as
given, or `run:RUN[@STEP]` exported, through the export code path, to a temporary one. Its model files (config,
safetensors, tokenizer) are then copied into the new run (`<run>/init_model/`, on the run's storage) and the
run's config names that copy. So every worker (on any node; from s3 too) loads one kind of source, every
strategy's checkpoint works, and a fine-tuned run stays usable (export, eval, resume) when its source folder
or run is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from data_pipeline import storage
from data_pipeline import tokenizer as bpe
from orchestrator.config import KilnConfig, UsageError, absolute_url
from trainers.checkpoint.layout import Committed
from trainers.config import ConfigError
from trainers.config.parallel import check_model_splits
from trainers.pretrained import (
    PretrainedError,
    check_data,
    check_folder_labels,
    check_vocabulary,
    inspect_folder,
    model_files,
    read_config,
)
from trainers.run.folder import INIT_MODEL_DIR
from trainers.task_data import PRETRAINED_CLASS


@dataclass(frozen=True)
class SourceRun:
    """model.init_from=run:RUN[@STEP] as the planner found it: that run's saved config and verified checkpoint."""

    run_id: str
    cfg: KilnConfig
    checkpoint: Committed
    tokenizer_url: str  # the run's own copy of its tokenizer


@dataclass(frozen=True)
class DataTokens:
    """The tokenizer the run's data was prepared with, as a source's tokenizer is compared with it."""

    url: str  # the dataset
    vocab: Mapping[str, int]


@dataclass(frozen=True)
class InitSource:
    """What the planner resolved: notes for the run's record, and the model to copy once the run's folder exists."""

    notes: tuple[str, ...] = ()
    folder: str | None = None  # a local Hugging Face folder whose model files are copied to `target`
    target: str | None = None

    def install(self) -> None:
        """Copy the model files into the run's folder (call after the run's folder is created)."""
        if self.folder is None or self.target is None or self.folder == self.target:
            return
        with tempfile.TemporaryDirectory(prefix="kiln-init-") as links:  # only the model's files, uploaded as one
            for name in model_files(self.folder):
                os.symlink(os.path.join(self.folder, name), os.path.join(links, name))
            storage.put_folder(links, self.target)


@contextmanager
def init_source(
    cfg: KilnConfig, source: SourceRun | None, data: DataTokens | None, log: Callable[[str], None]
) -> Iterator[InitSource]:
    """Check cfg.model.init_from against the run's data (UsageError on bad input) and point it at the run's own
    copy; yields what to install into the run's folder. An export made here is removed on leaving."""
    value = cfg.model.init_from
    if value is None:
        yield InitSource()
        return
    if data is None:  # the planner reads the data's tokenizer whenever there is a model.init_from
        raise UsageError(f"model.init_from={value}: the run's data was not resolved before its source was checked")
    name = f"model.init_from={value}"
    target = storage.join(cfg.run_url, INIT_MODEL_DIR)
    exported: str | None = None
    try:
        if source is None:
            folder = check_folder(cfg, absolute_url(value), name, data)
            check_mesh_fits(cfg, folder, name)
            note = f"{name}: copied to {target}"
        else:
            check_source_splits(cfg, source, name)  # before the export, which would be left behind
            exported, note = export_run(cfg, name, source, data, log)
            folder = exported
            note = f"{note}, copied to {target}"
    except PretrainedError as exc:
        raise UsageError(str(exc)) from None
    cfg.model.init_from = target
    try:
        yield InitSource(notes=(note,), folder=folder, target=target)
    finally:
        if exported is not None:
            shutil.rmtree(exported, ignore_errors=True)


def check_submitted(cfg: KilnConfig, source: SourceRun | None, data: DataTokens | None) -> None:
    """`kiln submit`: check cfg.model.init_from from here without copying anything (the run, once started on
    the cluster, copies it): a folder must be absolute and a model the task trains (with the data's tokenizer
    when the data is known here). UsageError on bad input."""
    value = cfg.model.init_from
    if value is None:
        return
    name = f"model.init_from={value}"
    try:
        if source is None:
            if "://" not in value and not os.path.isabs(value):
                raise UsageError(
                    f"{name} is not an absolute path, but a submitted run starts on the cluster, not here: "
                    f"give the folder's absolute path (e.g. model.init_from={absolute_url(value)})"
                )
            path = absolute_url(value)
            if data is not None:
                check_folder(cfg, path, name, data)
            else:
                inspect_folder(path, PRETRAINED_CLASS[cfg.task.name], cfg.task.name, name)
                check_mesh_fits(cfg, path, name)
        elif data is not None:
            check_run_vocabulary(source, data)
    except PretrainedError as exc:
        raise UsageError(str(exc)) from None


def check_mesh_fits(cfg: KilnConfig, path: str, name: str) -> None:
    """With parallel.tensor, the folder's model is one Kiln can split that many ways (its arch and heads)."""
    if cfg.parallel.tensor == 1:
        return
    config = read_config(path, name)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    try:
        check_model_splits(cfg.parallel.tensor, config.model_type, heads, kv_heads, where=f"{name}'s config.json")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def check_source_splits(cfg: KilnConfig, source: SourceRun, name: str) -> None:
    """With parallel.tensor, the source run's model (its saved config) is one Kiln can split that many ways."""
    model = source.cfg.model
    if cfg.parallel.tensor == 1 or model.init_from is not None:  # a folder decided that run's model: the worker checks
        return
    try:
        check_model_splits(cfg.parallel.tensor, model.arch, model.n_head, model.n_kv_head or model.n_head, name)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def check_folder(cfg: KilnConfig, path: str, name: str, data: DataTokens) -> str:
    """The folder's model fits the task and the data; returns its path."""
    model = inspect_folder(path, PRETRAINED_CLASS[cfg.task.name], cfg.task.name, name)
    check_data(model, name, data.url, dict(data.vocab), cfg.data.seq_len)
    if cfg.task.name == "classification":
        check_folder_labels(path, name, cfg.task.labels or [])
    return path


def check_run_vocabulary(source: SourceRun, data: DataTokens) -> None:
    """The source run's tokenizer is the one the data was prepared with."""
    vocab = dict(bpe.load(source.tokenizer_url).get_vocab())
    check_vocabulary(f"run {source.run_id}", vocab, data.url, dict(data.vocab), source.tokenizer_url)


def export_run(
    cfg: KilnConfig, name: str, source: SourceRun, data: DataTokens, log: Callable[[str], None]
) -> tuple[str, str]:
    """Export the source run's checkpoint to a temporary local folder, checked as any init_from folder;
    returns (folder, a note for the run's record)."""
    from trainers.export import model_from_checkpoint, save_hugging_face

    check_run_vocabulary(source, data)
    checkpoint, source_cfg = source.checkpoint, source.cfg
    strategy = checkpoint.manifest["strategy"]
    staged = tempfile.mkdtemp(prefix="kiln-init-")
    try:
        log(f"{name}: exporting run {source.run_id} step {checkpoint.step} ({strategy}) to start from")
        with warnings.catch_warnings():  # DCP's note that it reads in one process: that is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            model = model_from_checkpoint(
                source_cfg.task, source_cfg.model, checkpoint.url, strategy, source.tokenizer_url
            )
        save_hugging_face(
            model, source.tokenizer_url, staged, task=source_cfg.task.name, seq_len=source_cfg.data.seq_len
        )
        check_folder(cfg, staged, name, data)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged, f"{name}: starts from run {source.run_id} step {checkpoint.step} ({strategy})"
