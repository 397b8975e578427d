"""The quickstart corpus: the running interpreter's own standard-library `.py` files.

Every machine with Python has it, so the quickstart needs no download. Files are split into train and
val by a hash of their path (stable across machines with the same Python), a tokenizer is trained on
the train files only, and both splits are packed into a prepared dataset. The result is cached by a
fingerprint of everything that shapes it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from data_pipeline import storage
from data_pipeline import tokenizer as bpe
from data_pipeline.config import DataConfig
from data_pipeline.dataset import MANIFEST, ShardWriter, token_dtype, write_manifest
from data_pipeline.split import in_validation, split_digest

SKIPPED_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "tkinter",
}


def stdlib_files(max_files: int | None = None) -> tuple[Path, list[Path]]:
    """The stdlib root and its .py files (tests and bundled apps excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not SKIPPED_DIRS.intersection(f.relative_to(root).parts[:-1]))
    if max_files is not None:
        files = files[:max_files]
    return root, files


def split_files(root: Path, files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, val) files; val gets at least one file so evaluation always has data."""
    rel = {f: f.relative_to(root).as_posix() for f in files}
    val = [f for f in files if in_validation(rel[f].encode("utf-8"), val_fraction)]
    if not val:
        val = [min(files, key=lambda f: split_digest(rel[f].encode("utf-8")))]
    chosen = set(val)
    return [f for f in files if f not in chosen], val


def fingerprint(root: Path, files: list[Path], cfg: DataConfig) -> str:
    """A hash of every input that shapes the prepared dataset."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "python": sys.version,
                "seq_len": cfg.seq_len,
                "vocab_size": cfg.vocab_size,
                "val_fraction": cfg.val_fraction,
                # 2: the tokenizer has the mask token; 3: a complete tokenizer folder with the chat role tokens
                "format": 3,
            }
        ).encode()
    )
    for f in files:
        stat = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_source(path: Path) -> str:
    """A source file's text; undecodable bytes are replaced rather than failing the corpus."""
    return path.read_bytes().decode("utf-8", errors="replace")


def prepare_stdlib(cfg: DataConfig, cache_dir: str, log: Callable[[str], None] = print) -> str:
    """Prepare (or reuse from cache) the stdlib corpus; returns the dataset folder URL."""
    root, files = stdlib_files(cfg.max_files)
    if len(files) < 2:
        raise FileNotFoundError(f"found fewer than 2 .py files under the stdlib at {root}")
    key = fingerprint(root, files, cfg)
    url = storage.join(cache_dir, "datasets", f"stdlib-{key}")
    if storage.exists(storage.join(url, MANIFEST)):
        log(f"data: reusing prepared stdlib corpus {url}")
        return url
    started = time.perf_counter()
    train_files, val_files = split_files(root, files, cfg.val_fraction)
    # With the chat role tokens and template: a model pretrained here can be fine-tuned to chat (kind=chat data
    # prepared with its export's tokenizer) and then chat, with the same vocabulary.
    tokenizer = bpe.train_kiln_tokenizer((read_source(f) for f in train_files), cfg.vocab_size)
    tokenizer_sha = bpe.save(tokenizer, storage.join(url, "tokenizer"))
    eos_id = bpe.require_eos(tokenizer, "the stdlib corpus")
    vocab_size = len(tokenizer)
    splits = {}
    for split, split_files_ in (("train", train_files), ("val", val_files)):
        writer = ShardWriter(url, split, seq_len=cfg.seq_len, vocab_size=vocab_size, eos_id=eos_id)
        texts = [read_source(f) for f in split_files_]
        for ids in tokenizer(texts)["input_ids"]:
            writer.add(ids)
        splits[split] = writer.close()
        splits[split]["files"] = len(split_files_)
    write_manifest(
        url,
        {
            "kind": "pretrain",
            "seq_len": cfg.seq_len,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "bos_id": tokenizer.bos_token_id,
            "pad_id": tokenizer.pad_token_id,
            "dtype": token_dtype(vocab_size).str,
            "tokenizer": {"path": "tokenizer", "sha256": tokenizer_sha},
            "source": {"name": "python-stdlib", "root": str(root), "fingerprint": key},
            "split": {"method": "sha256(relative path)", "val_fraction": cfg.val_fraction},
            "splits": splits,
        },
    )
    log(
        f"data: prepared stdlib corpus in {time.perf_counter() - started:.1f}s: "
        f"{splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens -> {url}"
    )
    return url
