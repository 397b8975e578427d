"""The loop runs under plain torchrun (no Ray): the helpers every torchrun test uses, and the import rule.

Exact restarts are shown under Ray in tests/integration/test_fault_tolerance.py against torchrun runs,
and `--resume` under torchrun in tests/distributed/test_strategies.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m orchestrator.torchrun ARGS`."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "orchestrator.torchrun",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainers_never_import_ray():
    sources = list((REPO / "trainers").rglob("*.py"))
    assert sources
    for path in sources:
        text = path.read_text()
        assert "import ray" not in text and "from ray" not in text, path
    code = (
        "import sys, trainers.loop, orchestrator.torchrun; "
        "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0
