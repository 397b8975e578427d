"""One planning pass: a run's plan built top-down, each check called once, before anything starts.

`kiln train` (and a sweep's new trial, and torchrun), `kiln submit`, `kiln start` and `kiln resume` each build
their `RunPlan` (orchestrator/run/plan.py) with one function here, in an order that makes bad input fail before
the run's folder exists (its id stays free) and before Ray starts. The lower modules are given what the plan
found (a `run:` source, the data's tokenizer); none of them calls back up here or into orchestrator/run/lifecycle.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from data_pipeline import storage
from data_pipeline import tokenizer as bpe
from data_pipeline.stdlib_corpus import prepare_stdlib
from orchestrator.cluster.placement import Placement
from orchestrator.config import KilnConfig, UsageError, absolute_url, finalize
from orchestrator.run.init_source import DataTokens, InitSource, SourceRun, check_submitted, init_source
from orchestrator.run.lifecycle import find_checkpoint, prepare_resume, register_run, reopen_run
from orchestrator.run.plan import RunPlan, placement_of
from orchestrator.run.registry import DamagedRun, RunRecord, RunRegistry, UnknownRun
from trainers.checkpoint import reference
from trainers.config import parse_init_run
from trainers.errors import CheckpointError
from trainers.run.folder import TOKENIZER_DIR
from trainers.run.state import RunState
from trainers.run_data import RunData, check_run_data

Log = Callable[[str], None]


def checked_placement(cfg: KilnConfig, on_ray: bool = True) -> Placement:
    """The run's placement, refused at once when an embedded Ray of this machine could never hold it (on_ray=False:
    torchrun has started the processes already, whatever Ray could place)."""
    from orchestrator.cluster.ray_handle import check_embedded_fits

    placement = placement_of(cfg.cluster)
    if on_ray:
        check_embedded_fits(placement)
    return placement


def resolve_data(cfg: KilnConfig, log: Log) -> RunData:
    """Point cfg.data.path at a prepared dataset (preparing the built-in corpus if that is the source), check
    that it fits the run, and fill in task.labels (saved with the run's config) from a classifier's data."""
    if cfg.data.source == "stdlib":
        if cfg.data.cache_dir is None:  # finalize() sets it
            raise UsageError("data.cache_dir is unset: the config was not finalized")
        cfg.data.path = prepare_stdlib(cfg.data, cfg.data.cache_dir, log=log)
    if cfg.data.source == "mixture":
        for entry in cfg.data.mixture:
            entry.path = absolute_url(entry.path)
        cfg.data.path = cfg.data.mixture[0].path  # its tokenizer is every part's
    data = check_run_data(cfg.data, cfg.task.name, cfg.task.labels, cfg.model.vocab_size, log)
    if data.labels is not None:
        cfg.task.labels = list(data.labels)
    return data


def find_source_run(cfg: KilnConfig) -> SourceRun | None:
    """model.init_from=run:RUN[@STEP]: that run's saved config and verified checkpoint; None for a folder."""
    value = cfg.model.init_from
    parsed = parse_init_run(value) if value is not None else None
    if parsed is None:
        return None
    run_id, step = parsed
    try:
        registry, _record, source_cfg = reopen_run(cfg.storage.root, run_id, [])
        checkpoint = find_checkpoint(registry, source_cfg, step)
    except (UnknownRun, DamagedRun, CheckpointError) as exc:
        raise UsageError(f"model.init_from={value}: {exc}") from None
    return SourceRun(run_id, source_cfg, checkpoint, storage.join(registry.run_url(run_id), TOKENIZER_DIR))


def data_tokens(cfg: KilnConfig, data: RunData | None) -> DataTokens | None:
    """The data's tokenizer vocabulary, read once, when there is a model.init_from to compare with it."""
    if cfg.model.init_from is None or data is None:
        return None
    return DataTokens(data.url, dict(bpe.load(data.tokenizer_url).get_vocab()))


@contextmanager
def plan_run(cfg: KilnConfig, log: Log, on_ray: bool = True) -> Iterator[RunPlan]:
    """`kiln train`, a sweep's new trial, torchrun (on_ray=False): the plan of a new run (an export made for
    model.init_from is removed on leaving, so register the run inside)."""
    placement = checked_placement(cfg, on_ray)
    finalize(cfg)
    RunRegistry(cfg.storage.root).check_root()
    data = resolve_data(cfg, log)
    with init_source(cfg, find_source_run(cfg), data_tokens(cfg, data), log) as init:
        yield RunPlan(cfg, data, init, placement)


def start_run(cfg: KilnConfig, log: Log = print, on_ray: bool = True) -> tuple[RunPlan, RunRegistry, RunRecord]:
    """Plan a new run and register it (PENDING), its model.init_from and tokenizer saved with it."""
    with plan_run(cfg, log, on_ray) as plan:
        registry, record = register_run(plan)
    return plan, registry, record


def check_submission_source(cfg: KilnConfig, data: RunData | None) -> None:
    """`kiln submit`: model.init_from checked from here (against the data when it is known here)."""
    check_submitted(cfg, find_source_run(cfg), data_tokens(cfg, data))


def plan_submission(cfg: KilnConfig, log: Log) -> RunPlan:
    """`kiln submit`: storage, a given dataset and model.init_from checked from here. The built-in corpus is
    prepared, and model.init_from copied into the run, where the run starts (`kiln start`)."""
    cache_dir = cfg.data.cache_dir  # the cluster's own cache unless the user chose one
    finalize(cfg)
    cfg.data.cache_dir = cache_dir
    RunRegistry(cfg.storage.root).check_root()
    data = resolve_data(cfg, log) if cfg.data.source != "stdlib" else None
    check_submission_source(cfg, data)
    return RunPlan(cfg, data, InitSource(), placement_of(cfg.cluster))


@contextmanager
def plan_start(root: str, run_id: str, overrides: list[str], log: Log) -> Iterator[tuple[RunPlan, RunRecord]]:
    """`kiln start`: the plan of a registered (PENDING) run's first attempt, made where it runs."""
    _registry, record, cfg = reopen_run(root, run_id, overrides)
    if record.state != RunState.PENDING:
        raise UsageError(
            f"run {run_id} is {record.state}, not PENDING: `kiln start` starts a submitted run once; "
            f"continue it with `kiln resume {run_id}`"
        )
    finalize(cfg)
    data = resolve_data(cfg, log)
    with init_source(cfg, find_source_run(cfg), data_tokens(cfg, data), log) as init:
        yield RunPlan(cfg, data, init, checked_placement(cfg)), record


def plan_resume(
    root: str, run_id: str, overrides: list[str], force: bool = False, log: Log = print, on_ray: bool = True
) -> tuple[RunPlan, RunRegistry, RunRecord]:
    """`kiln resume` (and a sweep's trial continued; torchrun's --resume with on_ray=False): the run's saved config
    checked resumable, its data checked (never prepared again: the run continues on what it trained on)."""
    registry, record, cfg = prepare_resume(root, run_id, overrides, force)
    if cfg.task.name == "dpo":  # its reference log-probs are read, never made again: damaged ones stop it here
        problem = reference.damaged(reference.reference_url(registry.run_url(run_id)))
        if problem:
            raise UsageError(problem)
    placement = checked_placement(cfg, on_ray)
    data = check_run_data(cfg.data, cfg.task.name, cfg.task.labels, cfg.model.vocab_size, log)
    return RunPlan(cfg, data, InitSource(), placement), registry, record
