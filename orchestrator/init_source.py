"""`model.init_from` on the driver: checked against the run's data before any worker starts.

Either kind of source ends as a local Hugging Face folder: a folder as given, or `run:RUN[@STEP]` exported,
through the export code path, to a temporary one. Its model files (config, safetensors, tokenizer) are then
copied into the new run (`<run>/init_model/`, on the run's storage) and the run's config names that copy.
So every worker (on any node; from s3 too) loads one kind of source, every strategy's checkpoint works, and a
fine-tuned run stays usable (export, eval, resume) when its source folder or run is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from data_pipeline import storage
from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import open_training_data
from orchestrator.config import KilnConfig, UsageError, absolute_url
from orchestrator.registry import DamagedRun, RunRegistry, UnknownRun
from trainers.checkpoint import Committed
from trainers.config import parse_init_run
from trainers.errors import CheckpointError
from trainers.pretrained import (
    PretrainedError,
    check_data,
    check_folder_labels,
    check_vocabulary,
    inspect_folder,
    model_files,
)
from trainers.run_folder import INIT_MODEL_DIR, TOKENIZER_DIR
from trainers.task_data import PRETRAINED_CLASS

# (storage root, run id, step or None) -> that run's saved config and verified checkpoint (orchestrator/runs.py)
FindCheckpoint = Callable[[str, str, int | None], tuple[KilnConfig, Committed]]


@dataclass
class InitSource:
    """What the driver resolved: a note for the run's record, and the model to copy once the run's folder exists."""

    notes: list[str] = field(default_factory=list)
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
def init_source(cfg: KilnConfig, find: FindCheckpoint, log: Callable[[str], None]) -> Iterator[InitSource]:
    """Check cfg.model.init_from against the run's resolved data (UsageError on bad input) and point it at the
    run's own copy; yields what to install into the run's folder. An export made here is removed on leaving."""
    value = cfg.model.init_from
    if value is None:
        yield InitSource()
        return
    name = f"model.init_from={value}"
    target = storage.join(cfg.run_url, INIT_MODEL_DIR)
    exported: str | None = None
    try:
        if parse_init_run(value) is None:
            folder = check_folder(cfg, absolute_url(value), name)
            note = f"{name}: copied to {target}"
        else:
            exported, note = export_run(cfg, value, find, log)
            folder = exported
            note = f"{note}, copied to {target}"
    except PretrainedError as exc:
        raise UsageError(str(exc)) from None
    cfg.model.init_from = target
    try:
        yield InitSource(notes=[note], folder=folder, target=target)
    finally:
        if exported is not None:
            shutil.rmtree(exported, ignore_errors=True)


def check_submitted(cfg: KilnConfig, find: FindCheckpoint, data_known: bool) -> None:
    """`kiln submit`: check cfg.model.init_from from here without copying anything (the run, once started on
    the cluster, copies it): a folder must be absolute and a model the task trains (with the data's tokenizer
    when data_known), a run:RUN[@STEP] must name a run and step there are. UsageError on bad input."""
    value = cfg.model.init_from
    if value is None:
        return
    name = f"model.init_from={value}"
    parsed = parse_init_run(value)
    try:
        if parsed is None:
            if "://" not in value and not os.path.isabs(value):
                raise UsageError(
                    f"{name} is not an absolute path, but a submitted run starts on the cluster, not here: "
                    f"give the folder's absolute path (e.g. model.init_from={absolute_url(value)})"
                )
            path = absolute_url(value)
            if data_known:
                check_folder(cfg, path, name)
            else:
                inspect_folder(path, PRETRAINED_CLASS[cfg.task.name], cfg.task.name, name)
        else:
            run_id, step = parsed
            try:
                find(cfg.storage.root, run_id, step)
            except (UnknownRun, DamagedRun, CheckpointError) as exc:
                raise UsageError(f"{name}: {exc}") from None
            if data_known:
                check_run_vocabulary(cfg, run_id)
    except PretrainedError as exc:
        raise UsageError(str(exc)) from None


def data_vocabulary(cfg: KilnConfig) -> tuple[str, dict[str, int]]:
    """(url, vocabulary) of the tokenizer the run's data was prepared with."""
    datasets, _ = open_training_data(cfg.data.source, cfg.data.path, cfg.data.mixture)
    return datasets[0].url, dict(bpe.load(datasets[0].tokenizer_url).get_vocab())


def check_folder(cfg: KilnConfig, path: str, name: str) -> str:
    """The folder's model fits the task and the data; returns its path."""
    model = inspect_folder(path, PRETRAINED_CLASS[cfg.task.name], cfg.task.name, name)
    data_url, data_vocab = data_vocabulary(cfg)
    check_data(model, name, data_url, data_vocab, cfg.data.seq_len)
    if cfg.task.name == "classification":
        check_folder_labels(path, name, cfg.task.labels or [])
    return path


def check_run_vocabulary(cfg: KilnConfig, run_id: str) -> str:
    """The run's tokenizer is the one the data was prepared with; returns the url of the run's tokenizer."""
    tokenizer_url = storage.join(RunRegistry(cfg.storage.root).run_url(run_id), TOKENIZER_DIR)
    data_url, data_vocab = data_vocabulary(cfg)
    check_vocabulary(f"run {run_id}", dict(bpe.load(tokenizer_url).get_vocab()), data_url, data_vocab, tokenizer_url)
    return tokenizer_url


def export_run(cfg: KilnConfig, value: str, find: FindCheckpoint, log: Callable[[str], None]) -> tuple[str, str]:
    """Export run:RUN[@STEP]'s checkpoint to a temporary local folder, checked as any init_from folder;
    returns (folder, a note for the run's record)."""
    from trainers.export import model_from_checkpoint, save_hugging_face

    parsed = parse_init_run(value)
    assert parsed is not None
    run_id, step = parsed
    name = f"model.init_from={value}"
    try:
        source_cfg, checkpoint = find(cfg.storage.root, run_id, step)
    except (UnknownRun, DamagedRun, CheckpointError) as exc:
        raise UsageError(f"{name}: {exc}") from None
    tokenizer_url = check_run_vocabulary(cfg, run_id)
    strategy = checkpoint.manifest["strategy"]
    staged = tempfile.mkdtemp(prefix="kiln-init-")
    try:
        log(f"{name}: exporting run {run_id} step {checkpoint.step} ({strategy}) to start from")
        with warnings.catch_warnings():  # DCP's note that it reads in one process: that is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            model = model_from_checkpoint(source_cfg.task, source_cfg.model, checkpoint.url, strategy, tokenizer_url)
        save_hugging_face(model, tokenizer_url, staged, task=source_cfg.task.name, seq_len=source_cfg.data.seq_len)
        check_folder(cfg, staged, name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged, f"{name}: starts from run {run_id} step {checkpoint.step} ({strategy})"
