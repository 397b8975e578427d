"""Data pipeline speed: `kiln prepare` vs the same tokenizer's single-process batch encode, and how
much of a training step waits for data.

    .venv/bin/python benchmarks/data.py

The corpus is the Python standard library's .py files written as JSON Lines (one document per file),
so the numbers are reproducible on any machine with Python 3.11. Both sides use the same, already
trained tokenizer, so tokenizer training is not timed. Prints results; asserts nothing.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline import tokenizer as bpe  # noqa: E402
from data_pipeline.prepare import PrepareConfig, prepare  # noqa: E402
from data_pipeline.stdlib_corpus import read_source, stdlib_files  # noqa: E402


def corpus(folder: Path) -> list[str]:
    """The stdlib as 4 JSONL files; returns the documents."""
    _, files = stdlib_files()
    texts = [read_source(f) for f in files]
    for part in range(4):
        with open(folder / f"part-{part}.jsonl", "w") as handle:
            for text in texts[part::4]:
                handle.write(json.dumps({"text": text}) + "\n")
    return texts


def data_wait_share(root: str) -> float:
    """Median share of step time spent waiting for the next batch in a 60-step quickstart."""
    subprocess.run(
        [
            str(Path(sys.executable).parent / "kiln"),
            "train",
            "experiment=quickstart",
            "run.id=wait",
            f"storage.root={root}",
            "train.max_steps=60",
            "train.eval_every=60",
            "train.checkpoint_every=60",
            "tracker=none",
        ],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    rows = [json.loads(line) for line in (Path(root) / "wait" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["perf/data_wait_frac"] for r in rows if "perf/data_wait_frac" in r]
    return statistics.median(shares[len(shares) // 5 :])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        texts = corpus(tmp_path)
        tokenizer = bpe.train_bpe(texts[:200], 8192)
        bpe.save(tokenizer, str(tmp_path / "tok"))

        started = time.perf_counter()
        encoded = tokenizer.encode_batch(texts)
        baseline_s = time.perf_counter() - started
        baseline_tokens = sum(len(e.ids) + 1 for e in encoded)

        import ray

        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")  # not timed
        summary = prepare(
            PrepareConfig(
                input=str(tmp_path / "*.jsonl"),
                output=str(tmp_path / "out"),
                tokenizer=str(tmp_path / "tok"),
                seq_len=1024,
                val_fraction=0.01,
            ),
            log=lambda m: None,
        )
        ray.shutdown()
        wait = data_wait_share(str(tmp_path / "runs"))
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "documents": len(texts),
        "tokens": summary.tokens,
        "prepare_s": round(summary.wall_s, 2),
        "prepare_tokens_per_s": round(summary.tokens_per_s),
        "single_process_encode_s": round(baseline_s, 2),
        "single_process_tokens_per_s": round(baseline_tokens / baseline_s),
        "ratio": round(summary.tokens_per_s / (baseline_tokens / baseline_s), 3),
        "quickstart_data_wait_share": round(wait, 5),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
