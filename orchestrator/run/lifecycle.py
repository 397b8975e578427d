"""Registering a planned run (orchestrator/run/plan.py), reopening one to continue it, keeping its record current."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING

from data_pipeline import storage
from data_pipeline.config import default_storage_root
from data_pipeline.dataset import open_dataset
from data_pipeline.redaction import redact_text
from orchestrator.config import KilnConfig, UsageError, absolute_url, load_saved_config, to_yaml
from orchestrator.run.attempts import merge_events
from orchestrator.run.record_codec import encode
from orchestrator.run.registry import CONFIG_FILE, RunRecord, RunRegistry
from orchestrator.run.resume_policy import ResumeAction, ResumeFacts, decide_resume
from trainers.checkpoint.layout import Committed, is_committed, step_dir, steps_on_storage
from trainers.errors import CheckpointError
from trainers.run.folder import CHECKPOINTS_DIR, TOKENIZER_DIR, WANDB_DIR
from trainers.run.state import RunState
from trainers.run.stop_request import clear_stop_request
from trainers.tracking import wandb_mode

if TYPE_CHECKING:
    from orchestrator.run.plan import RunPlan
    from trainers.checkpoint.store import CheckpointStore


def register_run(plan: RunPlan) -> tuple[RunRegistry, RunRecord]:
    """Create a planned new run (PENDING): its folder, config and record, its model.init_from copy, its tokenizer."""
    cfg = plan.cfg
    registry = RunRegistry(cfg.storage.root)
    record = new_record(cfg)
    record.notes.extend(plan.init.notes)
    record = registry.create(record, redact_text(to_yaml(cfg)))
    plan.init.install()
    save_tokenizer(cfg)
    return registry, record


def register_submission(plan: RunPlan, job_id: str, address: str) -> tuple[RunRegistry, RunRecord]:
    """Register a planned run that a Ray job will start (`kiln start`): PENDING, with its job id and cluster."""
    registry = RunRegistry(plan.cfg.storage.root)
    record = new_record(plan.cfg)
    record.job_id, record.cluster_address = job_id, address
    return registry, registry.create(record, redact_text(to_yaml(plan.cfg)))


def ready_registered(plan: RunPlan, record: RunRecord) -> RunRegistry:
    """Ready a registered (PENDING) run for its first attempt here: its model.init_from copy, config, tokenizer."""
    registry = RunRegistry(plan.cfg.storage.root)
    plan.init.install()  # the run's own copy of model.init_from, before its config names it
    # Saved again with the data (and model.init_from) as resolved here, so `kiln resume` finds what it used.
    registry.write_config(record.run_id, redact_text(to_yaml(plan.cfg)))
    record.notes.extend(plan.init.notes)
    save_tokenizer(plan.cfg)
    return registry


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

    from orchestrator.run.liveness import driver_alive, pid_start_time, this_host

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
    from trainers.checkpoint.store import CheckpointStore  # torch: not for `kiln status`, which only lists

    return CheckpointStore(
        storage.join(cfg.run_url, CHECKPOINTS_DIR),
        rank=0,
        world_size=1,
        strategy=cfg.strategy.name,
        config_hash="",
    )


def latest_checkpoint(cfg: KilnConfig) -> dict | None:
    """{"step", "uri"} of the newest step folder with a MANIFEST (cheap: no checksum pass)."""
    root = storage.join(cfg.run_url, CHECKPOINTS_DIR)
    for step in steps_on_storage(root):
        url = storage.join(root, step_dir(step))
        if is_committed(url):
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
    from trainers.checkpoint.store import verify

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


def resume_command(run_id: str, root: str, address: str | None = None, *, name_default_root: bool = True) -> str:
    """The one command that continues a run: on its cluster (--address) for a submitted run, found under root
    (--storage-root, left out for the default root unless name_default_root)."""
    where = f" --address {address}" if address else ""
    if not name_default_root and root == absolute_url(default_storage_root()):
        return f"kiln resume {run_id}{where}"
    return f"kiln resume {run_id}{where} --storage-root {root}"


def status_json(registry: RunRegistry, run_id: str) -> dict:
    """What `kiln status RUN --json` prints; for a submitted run, its Ray job as Ray reports it now."""
    from orchestrator.cluster.jobs import job_view
    from orchestrator.run.submitted import displayed_state

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
        "resume_command": None
        if record.state == RunState.SUCCEEDED
        else resume_command(record.run_id, registry.root, record.cluster_address, name_default_root=False),
    }


def dumps(obj: dict) -> str:
    """Stable JSON for the CLI."""
    return json.dumps(obj, indent=2, sort_keys=True)
