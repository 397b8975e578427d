"""Turning a validated config into a registered run with its data ready, and keeping its record current."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

from data_pipeline import storage
from data_pipeline.config import default_storage_root
from data_pipeline.dataset import DatasetError, open_dataset, open_training_data
from data_pipeline.redaction import redact_text
from data_pipeline.stdlib_corpus import prepare_stdlib
from orchestrator.attempts import merge_events
from orchestrator.config import KilnConfig, UsageError, absolute_url, finalize, load_saved_config, to_yaml
from orchestrator.init_source import check_submitted, init_source
from orchestrator.record_codec import encode
from orchestrator.registry import CONFIG_FILE, RunRecord, RunRegistry
from orchestrator.resume_policy import ResumeAction, ResumeFacts, decide_resume
from trainers.checkpoint import MANIFEST, CheckpointError, CheckpointStore, Committed, verify
from trainers.preemption import clear_stop_request
from trainers.run_folder import CHECKPOINTS_DIR, TOKENIZER_DIR, WANDB_DIR
from trainers.run_state import RunState
from trainers.task_data import check_task_data, run_labels
from trainers.tracking import wandb_mode


def resolve_data(cfg: KilnConfig, log: Callable[[str], None]) -> None:
    """Point cfg.data.path at a prepared dataset (preparing the built-in corpus if that is the source) and
    check that it fits the run: whole train and val splits, seq_len, vocabulary, and what the task needs."""
    if cfg.data.source == "stdlib":
        if cfg.data.cache_dir is None:  # finalize() sets it
            raise UsageError("data.cache_dir is unset: the config was not finalized")
        cfg.data.path = prepare_stdlib(cfg.data, cfg.data.cache_dir, log=log)
    if cfg.data.source == "mixture":
        for entry in cfg.data.mixture:
            entry.path = absolute_url(entry.path)
        cfg.data.path = cfg.data.mixture[0].path  # its tokenizer is every part's
    datasets, _ = open_training_data(cfg.data.source, cfg.data.path, cfg.data.mixture)
    for part in datasets:
        part.check_trainable()  # an empty split (a dataset prepared before prepare refused one) fails here
    dataset = datasets[0]
    if dataset.seq_len != cfg.data.seq_len:
        raise DatasetError(
            f"data.seq_len={cfg.data.seq_len} but the dataset at {cfg.data.path} was prepared "
            f"with seq_len={dataset.seq_len}; set data.seq_len={dataset.seq_len}"
        )
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < dataset.vocab_size:
        raise DatasetError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({dataset.vocab_size}) of {cfg.data.path}; raise it or leave it unset"
        )
    check_task_data(cfg.task.name, datasets, log)  # e.g. task=sft on data without a loss mask
    if cfg.task.name == "classification":  # the data's classes, saved with the run's config
        cfg.task.labels = run_labels(cfg.task.labels, datasets)


def start_run(cfg: KilnConfig, log: Callable[[str], None] = print) -> tuple[RunRegistry, RunRecord]:
    """Give the run an id, check its storage and data, register it (PENDING) and save its tokenizer with it."""
    finalize(cfg)
    registry = RunRegistry(cfg.storage.root)
    # Everything that can fail on bad input is checked before the run's folder exists, so a mistake
    # leaves nothing behind that blocks the run id.
    registry.check_root()
    resolve_data(cfg, log)
    # model.init_from checked against the data (run:RUN exported), then copied into the run's folder
    with init_source(cfg, run_checkpoint, log) as source:
        record = new_record(cfg)
        record.notes.extend(source.notes)
        record = registry.create(record, redact_text(to_yaml(cfg)))
        source.install()
    save_tokenizer(cfg)
    return registry, record


def register_submission(
    cfg: KilnConfig, job_id: str, address: str, log: Callable[[str], None] = print
) -> tuple[RunRegistry, RunRecord]:
    """Register a run that a Ray job will start (`kiln start`): PENDING, with its job id and cluster.

    Storage, a given dataset and model.init_from are checked from here, so bad input fails before anything is
    submitted. The built-in corpus is prepared, and model.init_from copied into the run, where the run starts.
    """
    cache_dir = cfg.data.cache_dir  # the cluster's own cache unless the user chose one
    finalize(cfg)
    cfg.data.cache_dir = cache_dir
    registry = RunRegistry(cfg.storage.root)
    registry.check_root()
    data_known = cfg.data.source != "stdlib"
    if data_known:
        resolve_data(cfg, log)
    check_submitted(cfg, run_checkpoint, data_known)
    record = new_record(cfg)
    record.job_id, record.cluster_address = job_id, address
    return registry, registry.create(record, redact_text(to_yaml(cfg)))


def start_registered(
    root: str, run_id: str, overrides: list[str], log: Callable[[str], None] = print
) -> tuple[RunRegistry, RunRecord, KilnConfig]:
    """Ready a registered (PENDING) run for its first attempt here: its data resolved, its tokenizer saved."""
    registry, record, cfg = reopen_run(root, run_id, overrides)
    if record.state != RunState.PENDING:
        raise UsageError(
            f"run {run_id} is {record.state}, not PENDING: `kiln start` starts a submitted run once; "
            f"continue it with `kiln resume {run_id}`"
        )
    finalize(cfg)
    resolve_data(cfg, log)
    with init_source(cfg, run_checkpoint, log) as source:
        source.install()  # the run's own copy of model.init_from, before its config names it
        # Saved again with the data (and model.init_from) as resolved here, so `kiln resume` finds what it used.
        registry.write_config(run_id, redact_text(to_yaml(cfg)))
    record.notes.extend(source.notes)
    save_tokenizer(cfg)
    return registry, record, cfg


def new_record(cfg: KilnConfig) -> RunRecord:
    """A new run's record (PENDING) from its finalized config."""
    return RunRecord(
        run_id=cfg.run_id,
        experiment=cfg.run.name,
        max_steps=cfg.train.max_steps,
        strategy=cfg.strategy.name,
        num_workers=cfg.cluster.max_workers,
        wandb=(
            {
                "mode": wandb_mode(cfg.tracker),
                "run_id": cfg.run.id,
                "dir": storage.join(cfg.run_url, WANDB_DIR),
            }
            if cfg.tracker.name == "wandb"
            else None
        ),
    )


def save_tokenizer(cfg: KilnConfig) -> None:
    """Copy the resolved dataset's tokenizer into the run folder."""
    if cfg.data.path is None:  # resolve_data sets it
        raise UsageError("data.path is unset after resolving the data")
    copy_tokenizer(cfg.data.path, storage.join(cfg.run_url, TOKENIZER_DIR))


def reopen_run(root: str, run_id: str, overrides: list[str]) -> tuple[RunRegistry, RunRecord, KilnConfig]:
    """An existing run's registry entry and saved config (with resume-safe overrides) to continue it."""
    registry = RunRegistry(root)
    record = registry.load(run_id)
    for override in overrides:
        if override.lstrip("+").startswith("storage.root=") and absolute_url(override.split("=", 1)[1]) != root:
            raise UsageError(
                f"{override}: run {run_id} lives under {root}; storage.root says where to find a run "
                "when resuming (kiln resume RUN --storage-root URL), it cannot move one"
            )
    source = storage.join(registry.run_url(run_id), CONFIG_FILE)
    try:
        saved = storage.read_text(source)
    except FileNotFoundError:
        raise UsageError(
            f"run {run_id} has no {CONFIG_FILE} at {source} (its creation was interrupted); it "
            "cannot be resumed: start a new run"
        ) from None
    cfg = load_saved_config(saved, overrides, source)
    cfg.storage.root = root  # where the run is found now is where it lives (folders get moved)
    record.max_steps, record.num_workers = cfg.train.max_steps, cfg.cluster.max_workers
    return registry, record, cfg


def driver_verdict(record: RunRecord):
    """Whether the driver that a run's record names is still alive, judged from here and now."""
    import time

    from orchestrator.liveness import driver_alive, pid_start_time, this_host

    return driver_alive(record.driver, record.updated, time.time(), this_host(), pid_start_time)


def prepare_resume(
    root: str,
    run_id: str,
    overrides: list[str],
    force: bool = False,
) -> tuple[RunRegistry, RunRecord, KilnConfig]:
    """Check that run_id can be resumed and load it: its saved config with safe overrides applied."""
    registry, record, cfg = reopen_run(root, run_id, overrides)
    facts, driver_said = ResumeFacts(RunState(record.state), force, cfg.train.max_steps), ""
    while (action := decide_resume(facts)) != ResumeAction.RESUME:
        if action == ResumeAction.ASK_DRIVER:
            verdict = driver_verdict(record)
            facts, driver_said = replace(facts, driver_alive=verdict.alive), verdict.reason
        elif action == ResumeAction.ASK_CHECKPOINTS:
            newest = latest_checkpoint(cfg)  # storage is the truth: the record may predate a crash or a cleanup
            facts = replace(facts, checkpoints_asked=True, newest_step=newest["step"] if newest else None)
        elif action == ResumeAction.REFUSE_DRIVER_ALIVE:
            raise UsageError(
                f"run {run_id} is running: {driver_said}; stop it with `kiln stop {run_id}` "
                "first, or pass --force if you know its driver is gone"
            )
        else:
            raise UsageError(
                f"run {run_id} is {record.state} at step {record.step}/{record.max_steps}; "
                f"to train it further pass train.max_steps=N (N > {record.step})"
            )
    clear_stop_request(registry.run_url(run_id))  # a served `kiln stop` must not stop the resumed run
    return registry, record, cfg


def copy_tokenizer(dataset_url: str, target_url: str) -> None:
    """Save the dataset's tokenizer with the run, so the run is usable on its own."""
    source = open_dataset(dataset_url).tokenizer_url
    for rel, _ in storage.walk_files(source):
        storage.write_atomic(storage.join(target_url, rel), storage.read_bytes(storage.join(source, rel)))


def checkpoint_store(cfg: KilnConfig) -> CheckpointStore:
    """The run's checkpoints, seen from the driver (which lists and verifies, never saves)."""
    return CheckpointStore(
        storage.join(cfg.run_url, CHECKPOINTS_DIR),
        rank=0,
        world_size=1,
        strategy=cfg.strategy.name,
        config_hash="",
    )


def latest_checkpoint(cfg: KilnConfig) -> dict | None:
    """{"step", "uri"} of the newest step folder with a MANIFEST (cheap: no checksum pass)."""
    store = checkpoint_store(cfg)
    for step in store.steps_on_storage():
        url = store.url(step)
        if storage.exists(storage.join(url, MANIFEST)):
            return {"step": step, "uri": url}
    return None


def refresh(registry: RunRegistry, record: RunRecord, cfg: KilnConfig, step: int | None = None) -> None:
    """Update the record from what workers wrote: events (attempts), step (given, or metrics.jsonl), checkpoint."""
    merge_events(record, registry.run_url(record.run_id))
    if step is None:
        rows = registry.metrics(record.run_id)
        step = max((int(r.get("step", 0)) for r in rows), default=None)
    if step is not None:
        record.step = max(record.step, step)
    record.checkpoint = latest_checkpoint(cfg) or record.checkpoint
    registry.save(record)


def find_checkpoint(registry: RunRegistry, cfg: KilnConfig, step: int | None) -> Committed:
    """A verified checkpoint of the run: the given step, or the newest committed one."""
    store = checkpoint_store(cfg)
    if step is None:
        committed, skipped = store.latest_committed()
        if committed is None:
            detail = f" ({'; '.join(skipped)})" if skipped else ""
            raise CheckpointError(f"run {cfg.run.id} has no committed checkpoint{detail}")
        return committed
    if step not in store.steps_on_storage():
        raise CheckpointError(
            f"run {cfg.run.id} has no checkpoint at step {step}; it has {sorted(store.steps_on_storage()) or 'none'}"
        )
    return Committed(step, store.url(step), verify(store.url(step)))


def run_checkpoint(root: str, run_id: str, step: int | None) -> tuple[KilnConfig, Committed]:
    """A run's saved config and its verified checkpoint (the given step, or the newest committed one)."""
    registry, _record, cfg = reopen_run(root, run_id, [])
    return cfg, find_checkpoint(registry, cfg, step)


def resume_command(registry: RunRegistry, record: RunRecord) -> str | None:
    """The command that continues this run, if it can be continued (on its cluster, for a submitted run)."""
    if record.state == RunState.SUCCEEDED:
        return None
    root = registry.root
    return (
        f"kiln resume {record.run_id}"
        + (f" --address {record.cluster_address}" if record.cluster_address else "")
        + ("" if root == absolute_url(default_storage_root()) else f" --storage-root {root}")
    )


def status_json(registry: RunRegistry, run_id: str) -> dict:
    """What `kiln status RUN --json` prints; for a submitted run, its Ray job as Ray reports it now."""
    from orchestrator.submit import job_view
    from orchestrator.submitted_run import displayed_state

    record = registry.load(run_id)
    job = job_view(record.cluster_address, record.job_id) if record.job_id and record.cluster_address else None
    return {
        "run_id": record.run_id,
        "state": displayed_state(record.state, job.status if job else None),
        "recorded_state": record.state,
        "job": job.as_json() if job else None,
        "cluster_address": record.cluster_address,
        "step": record.step,
        "max_steps": record.max_steps,
        "checkpoint": record.checkpoint,
        "metrics": registry.latest_metrics(run_id),
        "wandb": record.wandb,
        "experiment": record.experiment,
        "strategy": record.strategy,
        "num_workers": record.num_workers,
        "created": record.created,
        "updated": record.updated,
        "attempts": [encode(attempt) for attempt in record.attempts],  # as run.json holds them
        "error": record.error,
        "run_dir": registry.run_url(run_id),
        "notes": record.notes,
        "resume_command": resume_command(registry, record),
    }


def dumps(obj: dict) -> str:
    """Stable JSON for the CLI."""
    return json.dumps(obj, indent=2, sort_keys=True)
