"""Typed config sections owned by the data pipeline: where data comes from and where runs are stored."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Where runs live when neither storage.root nor $KILN_STORAGE_ROOT says otherwise. The CLI, the torchrun
# launcher and conf/storage/local.yaml all take it from here, so they cannot disagree.
DEFAULT_STORAGE_ROOT = "./kiln-runs"
STORAGE_ROOT_ENV = "KILN_STORAGE_ROOT"


def default_storage_root() -> str:
    """$KILN_STORAGE_ROOT if set (even to ""), else DEFAULT_STORAGE_ROOT; read at each call, not at import."""
    return os.environ.get(STORAGE_ROOT_ENV, DEFAULT_STORAGE_ROOT)


class DataConfigError(ValueError):
    """A data or storage setting a user must fix; the message names the field."""


@dataclass
class MixtureEntry:
    """One prepared dataset of a mixture and its sampling weight."""

    path: str = "???"
    weight: float = 1.0


@dataclass
class DataConfig:
    """Training data: the built-in stdlib corpus, a prepared dataset folder, or a weighted mixture."""

    source: str = "stdlib"
    path: str | None = None  # URL of a prepared dataset folder (source=prepared)
    # source=mixture: e.g. data.mixture='[{path: s3://b/web, weight: 0.7}, {path: s3://b/code, weight: 0.3}]'
    mixture: list[MixtureEntry] = field(default_factory=list)
    seq_len: int = 128
    vocab_size: int = 4096  # when Kiln trains the tokenizer
    val_fraction: float = 0.05
    max_files: int | None = None  # cap the stdlib corpus (tests use a small one)
    # Where prepared corpora are cached; None: $KILN_CACHE_DIR, else ~/.cache/kiln.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.source not in ("stdlib", "prepared", "mixture"):
            raise DataConfigError(f"data.source must be one of stdlib, prepared, mixture; got {self.source!r}")
        if self.source == "mixture":
            if not self.mixture:
                raise DataConfigError("data.source=mixture needs data.mixture: a list of {path, weight}")
            for i, entry in enumerate(self.mixture):
                if not entry.path or entry.path == "???":
                    raise DataConfigError(f"data.mixture[{i}].path is required")
                if entry.weight <= 0:
                    raise DataConfigError(f"data.mixture[{i}].weight must be > 0, got {entry.weight}")
        if self.source == "prepared" and not self.path:
            raise DataConfigError(
                "data.path is required with data.source=prepared: point it at a folder written by `kiln prepare`"
            )
        if self.seq_len < 8:
            raise DataConfigError(f"data.seq_len must be >= 8, got {self.seq_len}")
        if not 256 < self.vocab_size <= 2**20:
            raise DataConfigError(f"data.vocab_size must be in (256, 1048576], got {self.vocab_size}")
        if not 0.0 < self.val_fraction < 0.5:
            raise DataConfigError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.max_files is not None and self.max_files < 2:
            raise DataConfigError(f"data.max_files must be >= 2 or null, got {self.max_files}")


@dataclass
class StorageConfig:
    """Where runs live: a local folder or an fsspec URL (s3://bucket/prefix)."""

    root: str = DEFAULT_STORAGE_ROOT

    def __post_init__(self) -> None:
        if not self.root:
            raise DataConfigError(
                f"storage.root must not be empty (default {DEFAULT_STORAGE_ROOT}; {STORAGE_ROOT_ENV} overrides it)"
            )
