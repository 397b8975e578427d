"""The train/val split every prepared dataset uses: a hash of a key, so it is stable across runs and machines.

A key (a stdlib file's relative path, a document's text) goes to val when the first 8 bytes of its
sha256, read as a fraction of 2**64, fall below val_fraction. Prepared datasets on storage were split
this way, so changing it would silently move documents between splits; tests/unit/test_split.py pins it.
"""

from __future__ import annotations

import hashlib


def split_digest(key: bytes) -> bytes:
    """The sha256 digest that places key in a split (callers encode their key; the bytes decide)."""
    return hashlib.sha256(key).digest()


def in_validation(key: bytes, val_fraction: float) -> bool:
    """Whether key belongs to the validation split."""
    return int.from_bytes(split_digest(key)[:8], "big") / 2**64 < val_fraction
