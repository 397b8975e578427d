"""Outputs that must never be half-replaced: build beside the target, then swap it in whole.

A crash or error while building leaves the old output exactly as it was; the swap itself is two
renames on one file system, and a leftover of an interrupted build is removed by the next one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
STAGING_PREFIX = ".kiln-staging-"
RETIRED_PREFIX = ".kiln-replaced-"


class OutputExists(FileExistsError):
    """The output folder already holds files and replacing it was not asked for."""


def replace_folder(target: str, build: Callable[[str], T], *, overwrite: bool, flag: str = "--overwrite") -> T:
    """Run build(staging_dir) and make its result `target` in one swap; returns what build returned.

    A non-empty target is refused unless overwrite (then it is replaced whole, never merged into).
    """
    out = Path(target).expanduser().resolve()
    if out.parent.is_dir():
        _remove_leftovers(out)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise OutputExists(
            f"{out} is not empty ({shown}); choose an empty or new folder, or pass {flag} to replace it whole"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out.name}-", dir=out.parent)
    try:
        result = build(staging)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would make the output private to this user
        _swap(Path(staging), out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _swap(staging: Path, out: Path) -> None:
    """staging becomes out; an old out is renamed away first and deleted only after the swap."""
    retired = None
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f"{RETIRED_PREFIX}{out.name}-", dir=out.parent))
        os.rmdir(retired)
        os.rename(out, retired)
    try:
        os.rename(staging, out)
    except BaseException:
        if retired is not None:
            os.rename(retired, out)  # put the old output back
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _remove_leftovers(out: Path) -> None:
    """Staging and retired folders an interrupted replace of out left beside it.

    A crash between the two renames leaves the old output only under its retired name: put it back.
    """
    retired = sorted(out.parent.glob(f"{RETIRED_PREFIX}{out.name}-*"), key=lambda p: p.stat().st_mtime)
    if retired and not out.exists():
        os.rename(retired[-1], out)
    for prefix in (STAGING_PREFIX, RETIRED_PREFIX):
        for leftover in out.parent.glob(f"{prefix}{out.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
