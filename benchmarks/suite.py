"""`make bench`: run every benchmark of issue 15 in one invocation and rewrite their sections of docs/benchmarks.md.

    .venv/bin/python benchmarks/suite.py [--only NAME,...] [--quick] [--no-docs]

Each entry of SUITE is a module of this folder exposing

    HEADING: str                      # its "## ..." section of docs/benchmarks.md
    measure(quick: bool) -> dict      # runs the benchmark; every number it reports, plus "machine" and "date"
    render(results: dict) -> str      # the section's markdown body: tables whose rows name machine, date, versions

The benchmarks run one after another (never side by side: they share the CPUs they measure) and each
one's raw results land in bench-results/NAME.json. `--quick` shortens every benchmark to a smoke run
(for checking the scripts, not for numbers); its results are never written to the docs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, write_docs

SUITE = ["throughput", "step_ab", "startup", "checkpoint"]
RESULTS = REPO / "bench-results"


def run_one(name: str, quick: bool, docs: bool) -> float:
    """Measure one benchmark, save its results, print its section and (unless quick) write it to the docs."""
    module = importlib.import_module(f"benchmarks.{name}")
    started = time.perf_counter()
    results = module.measure(quick)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    body = module.render(results)
    print(f"\n{module.HEADING}\n\n{body}\n", flush=True)
    if docs and not quick:
        write_docs(module.HEADING, body)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SUITE), help=f"comma-separated subset of {','.join(SUITE)}")
    parser.add_argument("--quick", action="store_true", help="smoke-run every benchmark; write nothing to the docs")
    parser.add_argument("--no-docs", action="store_true", help="print the tables, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(SUITE))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    took = {name: run_one(name, args.quick, not args.no_docs) for name in names}
    print("\n" + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in took.items()))


if __name__ == "__main__":
    main()
