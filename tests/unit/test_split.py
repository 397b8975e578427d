"""The train/val split is an on-storage format: these assignments were recorded before it had one home.

If one of them changes, every prepared dataset and cached stdlib corpus would be split differently
from how it was written, so fix the code, not the expectations.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.prepare import split_of
from data_pipeline.split import in_validation
from data_pipeline.stdlib_corpus import split_files

STDLIB_PATHS = {
    # relative path: (val at 0.05, val at 0.5)
    "os.py": (False, False),
    "json/__init__.py": (False, False),
    "collections/abc.py": (False, True),
    "asyncio/tasks.py": (False, True),
    "random.py": (False, True),
    "re/_parser.py": (False, True),
    "http/client.py": (False, True),
    "logging/handlers.py": (False, False),
}

DOCUMENTS = {
    # text: (split at 0.01, at 0.05, at 0.5)
    "hello world": ("train", "train", "train"),
    "def f():\n    return 1\n": ("train", "train", "val"),
    "": ("train", "train", "train"),
    "The quick brown fox": ("train", "train", "val"),
    "café": ("train", "train", "train"),
    "doc-7": ("train", "val", "val"),
    "doc-50": ("train", "val", "val"),
    "doc-178": ("val", "val", "val"),
    # a lone surrogate is hashed as "?" (errors="replace"), not refused
    "lone \ud800 surrogate": ("val", "val", "val"),
    "lone ? surrogate": ("val", "val", "val"),
}


@pytest.mark.parametrize("path", STDLIB_PATHS)
def test_stdlib_paths_keep_their_split(path):
    assert tuple(in_validation(path.encode("utf-8"), fraction) for fraction in (0.05, 0.5)) == STDLIB_PATHS[path]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_documents_keep_their_split(text):
    assert tuple(split_of(text, fraction) for fraction in (0.01, 0.05, 0.5)) == DOCUMENTS[text]


def test_stdlib_files_split_and_fallback_keep_their_choice():
    root = Path("/stdlib")
    names = [*STDLIB_PATHS, "email/mime/text.py", "typing.py"]
    files = [root / name for name in names]

    def val_names(fraction: float) -> list[str]:
        return [f.relative_to(root).as_posix() for f in split_files(root, files, fraction)[1]]

    # nothing falls below 0.05: the file with the smallest digest is val, so evaluation has data
    assert val_names(0.05) == ["asyncio/tasks.py"]
    assert val_names(0.5) == ["collections/abc.py", "asyncio/tasks.py", "random.py", "re/_parser.py", "http/client.py"]
