"""`model.init_from` on the driver: checked against the run's data before any worker starts.

A folder stays where it is (its path made absolute). `run:RUN[@STEP]` is exported, through the export
code path, to a Hugging Face folder that is copied into the new run (`<run>/init_model/`); the run's
config then names that copy. So every worker loads one kind of source, every strategy's checkpoint
works, and a fine-tuned run stays usable (export, eval, resume) when its source run is gone.
"""

from __future__ import annotations

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
from trainers.pretrained import PretrainedError, check_data, check_vocabulary, inspect_folder
from trainers.run_folder import TOKENIZER_DIR
from trainers.task_data import PRETRAINED_CLASS

INIT_MODEL_DIR = "init_model"  # inside the run folder: the model a run:RUN source was exported to
# (storage root, run id, step or None) -> that run's saved config and verified checkpoint (orchestrator/runs.py)
FindCheckpoint = Callable[[str, str, int | None], tuple[KilnConfig, Committed]]


@dataclass
class InitSource:
    """What the driver resolved: a note for the run's record, and what to copy once the run's folder exists."""

    notes: list[str] = field(default_factory=list)
    staged: str | None = None  # a local folder to copy to `target`
    target: str | None = None

    def install(self) -> None:
        """Copy a staged export into the run's folder (call after the run's folder is created)."""
        if self.staged is not None and self.target is not None:
            storage.put_folder(self.staged, self.target)


@contextmanager
def init_source(cfg: KilnConfig, find: FindCheckpoint, log: Callable[[str], None]) -> Iterator[InitSource]:
    """Check cfg.model.init_from against the run's resolved data (UsageError on bad input), pointing it at a
    folder; yields what to install into the run's folder. A staged export is removed on leaving."""
    value = cfg.model.init_from
    source = InitSource()
    if value is None:
        yield source
        return
    try:
        if parse_init_run(value) is None:
            cfg.model.init_from = check_folder(cfg, absolute_url(value), f"model.init_from={value}")
        else:
            source = stage_run(cfg, value, find, log)
    except PretrainedError as exc:
        raise UsageError(str(exc)) from None
    try:
        yield source
    finally:
        if source.staged is not None:
            shutil.rmtree(source.staged, ignore_errors=True)


def data_vocabulary(cfg: KilnConfig) -> tuple[str, dict[str, int]]:
    """(url, vocabulary) of the tokenizer the run's data was prepared with."""
    datasets, _ = open_training_data(cfg.data.source, cfg.data.path, cfg.data.mixture)
    return datasets[0].url, dict(bpe.load(datasets[0].tokenizer_url).get_vocab())


def check_folder(cfg: KilnConfig, path: str, name: str) -> str:
    """The folder's model fits the task and the data; returns its path."""
    model = inspect_folder(path, PRETRAINED_CLASS[cfg.task.name], cfg.task.name, name)
    data_url, data_vocab = data_vocabulary(cfg)
    check_data(model, name, data_url, data_vocab, cfg.data.seq_len)
    return path


def stage_run(cfg: KilnConfig, value: str, find: FindCheckpoint, log: Callable[[str], None]) -> InitSource:
    """Export run:RUN[@STEP]'s checkpoint to a local folder, checked as any init_from folder."""
    from trainers.export import model_from_checkpoint, save_hugging_face
    from trainers.tasks import build_task

    parsed = parse_init_run(value)
    assert parsed is not None
    run_id, step = parsed
    name = f"model.init_from={value}"
    try:
        source_cfg, checkpoint = find(cfg.storage.root, run_id, step)
    except (UnknownRun, DamagedRun, CheckpointError) as exc:
        raise UsageError(f"{name}: {exc}") from None
    tokenizer_url = storage.join(RunRegistry(cfg.storage.root).run_url(run_id), TOKENIZER_DIR)
    data_url, data_vocab = data_vocabulary(cfg)
    check_vocabulary(f"run {run_id}", dict(bpe.load(tokenizer_url).get_vocab()), data_url, data_vocab, tokenizer_url)
    strategy = checkpoint.manifest["strategy"]
    staged = tempfile.mkdtemp(prefix="kiln-init-")
    try:
        log(f"{name}: exporting run {run_id} step {checkpoint.step} ({strategy}) to start from")
        with warnings.catch_warnings():  # DCP's note that it reads in one process: that is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            model = model_from_checkpoint(
                build_task(source_cfg.task.name), source_cfg.model, checkpoint.url, strategy, tokenizer_url
            )
        save_hugging_face(model, tokenizer_url, staged)
        check_folder(cfg, staged, name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    target = storage.join(cfg.run_url, INIT_MODEL_DIR)
    cfg.model.init_from = target
    note = f"{name}: starts from run {run_id} step {checkpoint.step} ({strategy}), exported to {target}"
    return InitSource(notes=[note], staged=staged, target=target)
