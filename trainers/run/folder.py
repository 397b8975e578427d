"""Where a run lives on storage, `<storage.root>/<run_id>/`, and the names inside it (a stable format).

Every package that reads or writes a run folder takes the names from here, so the layout the design
promises (docs/architecture.md) has one definition.
"""

from __future__ import annotations

from data_pipeline import storage

RUN_FILE = "run.json"  # the run's record (orchestrator/run/registry.py)
CONFIG_FILE = "config.yaml"  # the resolved config, secrets redacted
METRICS_FILE = "metrics.jsonl"  # one line per logged step, rank 0
EVENTS_DIR = "events"  # one JSON object per event (trainers/run/events.py)
STOP_REQUEST = "STOP"  # present while a stop is requested (trainers/run/stop_request.py)
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"  # worker_<rank>.log (`worker_log_name`)
TOKENIZER_DIR = "tokenizer"  # the tokenizer the run trained with
INIT_MODEL_DIR = "init_model"  # the copy of the model the run starts from (orchestrator/run/init_source.py)
REFERENCE_DIR = "reference"  # task=dpo: the reference model's log-probs of every pair (trainers/reference.py)
RAY_DIR = "ray"  # Ray Train's own bookkeeping (a run in object storage keeps it under data.cache_dir)
WANDB_DIR = "wandb"  # W&B's files (a run in object storage gets them uploaded here)


def run_url(root: str, run_id: str) -> str:
    """The folder of run `run_id` under storage root `root`."""
    return storage.join(root, run_id)


def worker_log_name(rank: int) -> str:
    """The file name of worker `rank`'s log, in the run's LOGS_DIR."""
    return f"worker_{rank}.log"
