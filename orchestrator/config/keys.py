"""The schema's keys as users type them: their spelling, the full listing, and the ones a resume may change.

Python cannot spell every key users type (`async` is reserved), so a few schema fields have an alias:
overrides are translated to the schema's spelling on the way in, and keys, messages and saved YAML back
to the users' on the way out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf

from orchestrator.config.schema import KilnConfig

CONF_DIR = Path(os.environ.get("KILN_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))
# What users type -> the schema's field, where Python cannot spell the key (`async` is reserved).
KEY_ALIASES = {"checkpoint.async": "checkpoint.async_upload"}
# Dicts whose keys the user chooses, with an example of their override spelling. Hydra's grammar takes
# a ':' in a dict key only escaped with a backslash (quoted keys do not parse).
FREE_FORM_DICTS = {"cluster.resources_per_worker": r"cluster.resources_per_worker={GPU:1,accelerator_type\:H100:0.001}"}
QUOTED_DICT_KEY = re.compile(r"""[{,]\s*['"]""")

# What may change when a run continues: where and on how many workers it runs, how long, how it is
# checkpointed and watched; nothing that shapes its math. Storage credentials come from the AWS
# environment, never from config, so they change by changing the environment.
RESUME_SAFE_KEYS = (
    "cluster.num_workers",
    # The mesh: DCP saves DTensors by their global shape, so any mesh loads any other's checkpoint.
    "parallel.tensor",
    "parallel.replicate",
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

Tree = TypeVar("Tree")


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


def schema_tree(tree: Tree, to_user: bool = False) -> Tree:
    """A config as nested dicts with the aliased keys renamed to the schema's (or, to_user, the users') spelling."""
    for typed, field_name in KEY_ALIASES.items():
        source, target = (field_name, typed) if to_user else (typed, field_name)
        *path, leaf = source.split(".")
        node: object = tree
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
