"""The whole run's config: the root schema, its registration with Hydra, and composition from overrides.

Each package owns the dataclasses of its own sections; this module joins them, checks what spans
sections (batch math, sequence length vs. model size), and turns Hydra's composition errors into one
line that names the key and says what to do.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import default_storage_root
from data_pipeline.redaction import URL_CREDENTIALS, redact_text
from trainers.config import FOLDER_DECIDED, WorkerConfig, one_of, require

CONF_DIR = Path(os.environ.get("KILN_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))
# What users type -> the schema's field, where Python cannot spell the key (`async` is reserved).
KEY_ALIASES = {"checkpoint.async": "checkpoint.async_upload"}


class UsageError(Exception):
    """Bad user input: the CLI prints the message on one line and exits with code 2."""


# cluster.placement -> Ray Train's ScalingConfig.placement_strategy is the upper-case spelling.
PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")
# Dicts whose keys the user chooses, with an example of their override spelling. Hydra's grammar takes
# a ':' in a dict key only escaped with a backslash (quoted keys do not parse).
FREE_FORM_DICTS = {"cluster.resources_per_worker": r"cluster.resources_per_worker={GPU:1,accelerator_type\:H100:0.001}"}
QUOTED_DICT_KEY = re.compile(r"""[{,]\s*['"]""")


@dataclass
class ClusterConfig:
    """Where workers run: an embedded local Ray (address unset) or an existing cluster."""

    address: str | None = None
    # N workers, or [MIN, MAX]: Ray Train's elastic training (starts with what it can get from MIN up,
    # goes on with fewer when a node is lost, grows back when nodes return). The math does not change
    # with the count: the global batch is kept by gradient accumulation and the data cursor is global.
    num_workers: Any = 2
    # Elastic runs only: how often Ray Train looks for room to grow the group (Ray's default: 60 s).
    resize_check_s: float | None = None
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_failures: int = 2  # worker-group restarts from the last committed checkpoint
    # How Ray Train spreads the workers over nodes: Ray's PACK/SPREAD (soft: best effort) or
    # STRICT_PACK (all on one node) / STRICT_SPREAD (each on its own node), in lower case.
    placement: str = "pack"
    # Extra Ray resources each worker needs beyond cluster.cpus_per_worker (and the GPU of use_gpu), e.g.
    # `cluster.resources_per_worker={GPU:2}`, `cluster.resources_per_worker.my_resource=1`. Hydra takes a
    # ':' in a key only after a backslash (quoted keys do not parse), so in a shell:
    #   kiln train 'cluster.resources_per_worker={GPU:1,accelerator_type\:H100:0.001}'
    # An override adds to (merges into) the dict, as Hydra does with dicts.
    resources_per_worker: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_workers = worker_count(self.num_workers)
        require(
            self.resize_check_s is None or self.elastic,
            f"cluster.resize_check_s={self.resize_check_s} is ignored with a fixed cluster.num_workers="
            f"{self.num_workers}: give cluster.num_workers=[MIN,MAX] for an elastic run, or remove it",
        )
        require(
            self.resize_check_s is None or self.resize_check_s > 0,
            f"cluster.resize_check_s must be > 0 seconds, got {self.resize_check_s}",
        )
        require(self.cpus_per_worker > 0, f"cluster.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        require(self.max_failures >= -1, f"cluster.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        one_of("cluster.placement", self.placement, PLACEMENTS)
        self.check_resources()

    @property
    def elastic(self) -> bool:
        """Whether the worker count may change while the run goes on (cluster.num_workers=[MIN,MAX])."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with."""
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the run trains with."""
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers

    def check_resources(self) -> None:
        """resources_per_worker: positive amounts, and no key that another cluster setting owns."""
        for name, amount in self.resources_per_worker.items():
            key = f"cluster.resources_per_worker.{name}"
            number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
            require(number and amount > 0, f"{key} must be a number > 0 (fractions are allowed), got {amount!r}")
            require(
                name != "CPU",
                f"{key} conflicts with cluster.cpus_per_worker: set cluster.cpus_per_worker={amount:g} instead",
            )
            require(
                name != "GPU" or self.use_gpu,
                f"{key} is ignored with cluster.use_gpu=false: add cluster.use_gpu=true or remove it",
            )


def worker_count(value: Any) -> int | list[int]:
    """cluster.num_workers as given: N > 0, or [MIN, MAX] with 0 < MIN <= MAX (MIN == MAX is just N)."""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        bounds = list(value)
        usable = len(bounds) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        require(
            usable and 0 < bounds[0] <= bounds[1],
            f"cluster.num_workers={bounds} must be N or [MIN,MAX] with 0 < MIN <= MAX (an elastic run), "
            "e.g. cluster.num_workers=[2,8]",
        )
        return bounds[0] if bounds[0] == bounds[1] else bounds
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"cluster.num_workers must be > 0 (or [MIN,MAX] for an elastic run), got {value!r}",
    )
    return value


@dataclass
class KilnConfig(WorkerConfig):
    """A complete, validated training run: what the workers run on, and where they run."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for workers in range(self.cluster.min_workers, self.cluster.max_workers + 1):
            try:
                self.train.grad_accum(workers)  # every count an elastic run may train with keeps the global batch
            except ValueError as exc:
                if not self.cluster.elastic:
                    raise
                raise ValueError(
                    f"{exc} (an elastic run with cluster.num_workers={self.cluster.num_workers} may train with "
                    f"any count from {self.cluster.min_workers} to {self.cluster.max_workers})"
                ) from None
        require(
            self.strategy.precision != "fp16" or self.cluster.use_gpu,
            "strategy.precision=fp16 needs GPUs (cluster.use_gpu=true) for loss scaling; "
            "on CPU use strategy.precision=bf16 or fp32",
        )

    @property
    def grad_accum(self) -> int:
        """Micro-batches each worker accumulates per optimizer step (at the largest worker count)."""
        return self.train.grad_accum(self.cluster.max_workers)


ConfigStore.instance().store(name="kiln_schema", node=KilnConfig)
# conf/storage/local.yaml reads its default through this, so the yaml and the CLI share one definition.
OmegaConf.register_new_resolver("kiln.default_storage_root", default_storage_root, replace=True)


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


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a config as plain containers, list items as key[i]."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from leaves(value, f"{prefix.rstrip('.')}[{i}].")
    else:
        yield prefix.rstrip("."), obj


def check_values(config: Any) -> None:
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


# What may change when a run continues: where and on how many workers it runs, how long, how it is
# checkpointed and watched; nothing that shapes its math. Storage credentials come from the AWS
# environment, never from config, so they change by changing the environment.
RESUME_SAFE_KEYS = (
    "cluster.num_workers",
    "train.max_steps",
    "cluster.address",
    "cluster.max_failures",
    "cluster.cpus_per_worker",
    "cluster.use_gpu",
    "cluster.placement",
    "storage.root",
    "train.step_timeout_s",
    "train.checkpoint_every",
    "train.log_every",
    "checkpoint.keep_last",
    "checkpoint.keep_every",
    "checkpoint.async",
    "checkpoint.preempt_grace_s",
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


def schema_override(override: str) -> str:
    """An override with its key in the schema's spelling (`checkpoint.async=true` -> `checkpoint.async_upload=true`)."""
    body = override.lstrip("+~")
    key, equals, value = body.partition("=")
    return override[: len(override) - len(body)] + KEY_ALIASES.get(key, key) + equals + value


def add_free_keys(override: str) -> str:
    """A plain override of a free-form dict (or of one of its keys) made `++`, so new keys may be added.

    Hydra merges `key={...}` into the existing dict and, in struct mode, refuses any key not there yet.
    """
    key = override.partition("=")[0]
    if any(key == name or key.startswith(name + ".") for name in FREE_FORM_DICTS):
        return "++" + override
    return override


def user_spelling(text: str) -> str:
    """Text (a key, an error message) with schema field names spelled as users type them."""
    for typed, field_name in KEY_ALIASES.items():
        text = re.sub(rf"{re.escape(field_name)}\b", typed, text)
    return text


def schema_tree(tree: Any, to_user: bool = False) -> Any:
    """A config as nested dicts with the aliased keys renamed to the schema's (or, to_user, the users') spelling."""
    for typed, field_name in KEY_ALIASES.items():
        source, target = (field_name, typed) if to_user else (typed, field_name)
        *path, leaf = source.split(".")
        node = tree
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[target.rpartition(".")[2]] = node.pop(leaf)
    return tree


def config_keys() -> list[str]:
    """Every settable dotted key of the schema, for suggestions."""
    keys: list[str] = []

    def walk(node, prefix: str) -> None:
        for key in node:
            value = node._get_node(key)
            full = f"{prefix}{key}"
            if OmegaConf.is_dict(value) and OmegaConf.get_type(value) is not dict:
                walk(value, full + ".")
            else:
                keys.append(user_spelling(full))

    walk(OmegaConf.structured(KilnConfig), "")
    return keys


def group_names() -> list[str]:
    """The config groups a user can pick from (`strategy=ddp`)."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def explain_composition_error(exc: Exception, overrides: list[str]) -> str:
    """One actionable line for a Hydra/OmegaConf composition failure."""
    text = "\n".join(str(e) for e in _exception_chain(exc))
    missing_option = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        hint = difflib.get_close_matches(option, choices, n=1)
        did_you_mean = f" (did you mean {group}={hint[0]}?)" if hint else ""
        return f"{group}={option}: no such option{did_you_mean}; available: {', '.join(choices)}"
    key = _failing_key(text)
    if key and (
        "not in" in text
        or "not in struct" in text
        or ("Could not override" in text and "could not be converted" not in text and "Invalid value" not in text)
    ):
        return unknown_key_message(key)
    converted = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    if key and converted:
        value, wanted = converted.groups()
        return f"{key}: expected {wanted.lower()}, got {value!r}"
    invalid = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", text)
    if key and invalid:
        return f"{key}: invalid value {invalid.group(1)!r}; expected one of {invalid.group(2)}"
    free_form = free_form_problem(key, text, overrides)
    if free_form:
        return free_form
    if "LexerNoViableAltException" in text or "mismatched input" in text or "no viable alternative" in text:
        return unparsable_override_message(text, overrides)
    parse = re.search(r"Error parsing override '([^']*)'", text)
    if parse:
        return f"could not parse override '{parse.group(1)}': write key=value (e.g. train.max_steps=100)"
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"invalid config: {first}" + (f" (key: {key})" if key else "")


def free_form_problem(key: str | None, text: str, overrides: list[str]) -> str | None:
    """A free-form dict given something other than name:amount pairs, or a quoted key, with its spelling."""
    for name, example in FREE_FORM_DICTS.items():
        mine = [o for o in overrides if o.lstrip("+").startswith(name)]
        parse_error = "Error merging override" not in text and "Could not override" not in text
        if parse_error and any(QUOTED_DICT_KEY.search(o.partition("=")[2]) for o in mine):
            return f"{name}: write a key with ':' with a backslash before the ':', not in quotes: {example}"
        if key and (key == name or key.startswith(name + ".")):
            given = next((o.partition("=")[2] for o in mine), "")
            return f"{name} maps resource names to amounts > 0, e.g. {example}; got {given!r}"
    return None


def unparsable_override_message(text: str, overrides: list[str]) -> str:
    """Name the override Hydra's grammar rejected and the character it stumbled on."""
    culprit = next((o for o in overrides if o.strip() and o.strip() in text), None)
    odd = [o for o in overrides if any(not ch.isascii() or not ch.isprintable() for ch in o)]
    culprit = culprit if culprit is not None else (odd[0] if odd else None)
    if culprit is None:
        return "could not parse an override: write key=value (e.g. train.max_steps=100)"
    key = culprit.split("=", 1)[0]
    bad = next((ch for ch in culprit if not ch.isascii() or not ch.isprintable()), None)
    what = f"character {bad!r} is not allowed unquoted" if bad else "it does not fit Hydra's override grammar"
    return f"could not parse override {culprit!r}: {what}; quote the value ({key}='...') or remove it"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    return chain


def _failing_key(text: str) -> str | None:
    for pattern in (
        r"Could not override '([^']+)'",
        r"full_key: ([\w.\[\]]+)",
        r"Could not append to config\. An item is already at '([^']+)'",
    ):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def unknown_key_message(key: str) -> str:
    """Name an unknown key and suggest the closest valid one."""
    known = config_keys() + group_names()
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not hint and "." in key:
        section, _, _leaf = key.rpartition(".")
        same_section = [k for k in known if k.startswith(section + ".")]
        hint = difflib.get_close_matches(key, same_section, n=1, cutoff=0.3)
    suggestion = f"; did you mean {hint[0]}?" if hint else ""
    return f"unknown config key '{key}'{suggestion} (run `kiln train --list-keys` to list them)"
