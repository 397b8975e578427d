"""The whole run's config: composition from overrides, the value checks, a saved config reloaded, the driver's fill-in.

The parts live beside this module: the root schema and its registration with Hydra (schema.py), the keys
as users spell them (keys.py), and Hydra's composition errors turned into one line that names the key
and says what to do (explain.py). Every name other modules use is importable from here.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.redaction import URL_CREDENTIALS, redact_text
from orchestrator.config.explain import (
    explain_composition_error,
    free_form_problem,
    unknown_key_message,
    unparsable_override_message,
)
from orchestrator.config.keys import (
    CONF_DIR,
    FREE_FORM_DICTS,
    KEY_ALIASES,
    QUOTED_DICT_KEY,
    RESUME_SAFE_KEYS,
    add_free_keys,
    config_keys,
    group_names,
    schema_override,
    schema_tree,
    user_spelling,
)
from orchestrator.config.schema import PLACEMENTS, ClusterConfig, KilnConfig, worker_count
from trainers.config import FOLDER_DECIDED

__all__ = [
    "CONF_DIR",
    "FREE_FORM_DICTS",
    "KEY_ALIASES",
    "PLACEMENTS",
    "QUOTED_DICT_KEY",
    "RESUME_SAFE_KEYS",
    "ClusterConfig",
    "KilnConfig",
    "UsageError",
    "absolute_url",
    "add_free_keys",
    "check_init_from_overrides",
    "check_no_ignored_settings",
    "check_values",
    "compose_config",
    "config_keys",
    "explain_composition_error",
    "finalize",
    "free_form_problem",
    "group_names",
    "leaves",
    "load_saved_config",
    "new_run_id",
    "schema_override",
    "schema_tree",
    "to_yaml",
    "unknown_key_message",
    "unparsable_override_message",
    "user_spelling",
    "worker_count",
]


class UsageError(Exception):
    """Bad user input: the CLI prints the message on one line and exits with code 2."""


def compose_config(overrides: list[str]) -> KilnConfig:
    """Compose conf/config.yaml with Hydra-style overrides and validate it; UsageError on bad input."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="kiln"):
            composed = compose(config_name="config", overrides=[add_free_keys(schema_override(o)) for o in overrides])
        check_values(OmegaConf.to_container(composed, resolve=True))
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UsageError(redact_text(user_spelling(explain_composition_error(exc, overrides)))) from None
    except (ValueError, UsageError) as exc:
        raise UsageError(redact_text(user_spelling(str(exc)))) from None
    assert isinstance(cfg, KilnConfig)
    check_no_ignored_settings(cfg)
    check_init_from_overrides(cfg, overrides)
    return cfg


def check_init_from_overrides(cfg: KilnConfig, overrides: list[str]) -> None:
    """With model.init_from, a model shape set on the command line (even to its default) or a model=...
    choice is ignored (the folder decides it): an error. ModelConfig catches values that differ."""
    if cfg.model.init_from is None:
        return
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key == "model" or (key.startswith("model.") and key[len("model.") :] in FOLDER_DECIDED):
            raise UsageError(
                f"{override} is ignored with model.init_from={cfg.model.init_from} (the model's own config decides "
                "its architecture); remove it"
            )


def leaves(obj: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every leaf of a config as plain containers, list items as key[i]."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from leaves(value, f"{prefix.rstrip('.')}[{i}].")
    else:
        yield prefix.rstrip("."), obj


def check_values(config: object) -> None:
    """Values no section catches alone (non-finite numbers, credentials written into URLs), checked first."""
    for key, value in leaves(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{key} must be a finite number, got {value}")
        if isinstance(value, str) and URL_CREDENTIALS.search(value):
            raise UsageError(
                f"{key} has credentials written into its URL; Kiln takes them only from the "
                "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE): "
                "write the URL without user:password@"
            )


def check_no_ignored_settings(cfg: KilnConfig) -> None:
    """A setting the chosen option would ignore is an error, never silence (user input only).

    Saved configs are exempt: the driver itself fills data.path in for the built-in corpus.
    """
    source = cfg.data.source
    if cfg.data.path and source == "stdlib":
        raise UsageError(
            f"data.path={cfg.data.path} is ignored by data.source=stdlib (the built-in corpus); "
            "to train on it add data=prepared (or data.source=prepared)"
        )
    if cfg.data.path and source == "mixture":
        raise UsageError("data.path is ignored by data.source=mixture; list every dataset in data.mixture")
    if cfg.data.mixture and source != "mixture":
        raise UsageError(
            f"data.mixture is ignored by data.source={source}; add data=mixture (or data.source=mixture) to train on it"
        )
    if cfg.data.max_files is not None and source != "stdlib":
        raise UsageError(
            f"data.max_files caps the built-in corpus only and is ignored by data.source={source}; remove it"
        )


def load_saved_config(config_yaml: str, overrides: list[str], source: str) -> KilnConfig:
    """A run's saved config.yaml with only resume-safe overrides applied, validated again."""
    for override in overrides:
        key = user_spelling(schema_override(override).split("=", 1)[0].lstrip("+~"))
        if "=" not in override or key not in RESUME_SAFE_KEYS:
            raise UsageError(
                f"cannot override '{key}' when resuming {source}; only {', '.join(RESUME_SAFE_KEYS)} may change"
            )
    try:
        saved = OmegaConf.merge(
            OmegaConf.structured(KilnConfig),
            OmegaConf.create(schema_tree(OmegaConf.to_container(OmegaConf.create(config_yaml)))),
        )
        if saved.optim.schedule_steps is None:  # saved before optim.schedule_steps: its horizon was its own length
            saved.optim.schedule_steps = saved.train.max_steps
        merged = OmegaConf.merge(saved, OmegaConf.from_dotlist([schema_override(o) for o in overrides]))
        check_values(OmegaConf.to_container(merged, resolve=True))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise UsageError(redact_text(user_spelling(f"{source}: {explain_composition_error(exc, overrides)}"))) from None
    except (ValueError, UsageError) as exc:
        raise UsageError(redact_text(user_spelling(f"{source}: {exc}"))) from None
    assert isinstance(cfg, KilnConfig)
    return cfg


def finalize(cfg: KilnConfig) -> KilnConfig:
    """Fill in what the driver decides: a run id, the LR schedule's horizon, absolute paths (workers' cwd differs)."""
    if cfg.run.id is None:
        cfg.run.id = new_run_id(cfg.run.name)
    if cfg.optim.schedule_steps is None:  # fixed now and saved with the run: a resume's train.max_steps cannot move it
        cfg.optim.schedule_steps = cfg.train.max_steps
    cfg.storage.root = absolute_url(cfg.storage.root)
    if cfg.data.path:
        cfg.data.path = absolute_url(cfg.data.path)
    cfg.data.cache_dir = absolute_url(cfg.data.cache_dir or os.environ.get("KILN_CACHE_DIR") or "~/.cache/kiln")
    return cfg


def new_run_id(name: str) -> str:
    """A readable, unique id: name, UTC timestamp and 4 random hex digits."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def absolute_url(url: str) -> str:
    """Local paths become absolute (with ~ expanded); URLs with a scheme pass through."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


def to_yaml(cfg: KilnConfig) -> str:
    """The resolved config as YAML, keys spelled as users type them (callers redact secrets first)."""
    return OmegaConf.to_yaml(schema_tree(OmegaConf.to_container(OmegaConf.structured(cfg)), to_user=True))
