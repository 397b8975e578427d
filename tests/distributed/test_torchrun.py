"""The loop runs under plain torchrun (no Ray): the trainers never import Ray.

Exact restarts are shown under Ray in tests/integration/test_fault_tolerance.py against torchrun runs,
and `--resume` under torchrun in tests/distributed/test_strategies.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


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
