"""The options several `kiln` commands share, declared once: each command family's parser adds them here."""

from __future__ import annotations

import argparse

STORAGE_ROOT = "--storage-root"


def add_storage_root(parser: argparse.ArgumentParser, default: str | None, help: str | None = None) -> None:
    """`--storage-root`: where runs (and sweeps) live."""
    parser.add_argument(STORAGE_ROOT, default=default, help=help)


def add_json(parser: argparse.ArgumentParser, help: str = "print one JSON object") -> None:
    """`--json`: print machine-readable output."""
    parser.add_argument("--json", action="store_true", help=help)


def add_address(parser: argparse.ArgumentParser, help: str) -> None:
    """`--address`: a Ray cluster's Jobs API (http://HEAD:8265)."""
    parser.add_argument("--address", default=None, help=help)
