"""Time the README's quickstart end to end and record it in docs/benchmarks.md.

    .venv/bin/python benchmarks/quickstart.py [--fresh-cache]

Measures wall time of `kiln train experiment=quickstart` (Ray start, data, 300 steps, evals,
checkpoints), the start/end validation perplexity and steady-state tokens/s from the run's own
metrics.jsonl. No assertions: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
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


def measure(fresh_cache: bool) -> dict:
    """Run the quickstart once in a temporary storage root and summarise it."""
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "WANDB_MODE": "offline"}
        if fresh_cache:
            env["KILN_CACHE_DIR"] = str(Path(root) / "cache")
        started = time.perf_counter()
        subprocess.run(
            [
                str(Path(sys.executable).parent / "kiln"),
                "train",
                "experiment=quickstart",
                "run.id=bench",
                f"storage.root={root}",
            ],
            check=True,
            env=env,
            cwd=REPO,
        )
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (Path(root) / "bench" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/perplexity" in r]
    train = [r for r in rows if "perf/tokens_per_s" in r]
    steady = train[len(train) // 5 :]  # skip warm-up steps
    return {
        "wall_s": round(wall, 1),
        "val_ppl_start": round(val[0]["val/perplexity"], 1),
        "val_ppl_end": round(val[-1]["val/perplexity"], 1),
        "tokens_per_s_median": round(statistics.median(r["perf/tokens_per_s"] for r in steady)),
        "data_wait_frac_median": round(statistics.median(r["perf/data_wait_frac"] for r in steady), 4),
        "steps": train[-1]["step"],
        "fresh_cache": fresh_cache,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh-cache", action="store_true", help="prepare the corpus from scratch too")
    args = parser.parse_args()
    result = measure(args.fresh_cache)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
