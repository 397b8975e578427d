"""The training hot path talks to the other ranks only when it must: once per logged step, never per micro-batch."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import REPO, TINY, rows, torchrun_command

pytestmark = pytest.mark.slow


def test_a_step_that_logs_nothing_issues_no_collective_beyond_the_gradient_sync(tmp_path):
    out = tmp_path / "collectives.json"
    overrides = [
        *TINY,
        "tracker=none",
        "strategy=ddp",
        "train.global_batch=32",  # 2 micro-batches per worker and step: accumulation must not sync either
        "train.max_steps=20",
        "train.log_every=5",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "run.id=hot",
        f"storage.root={tmp_path}",
    ]
    cmd = torchrun_command("tests/distributed/count_collectives.py", str(out), *overrides)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = {int(step): calls for step, calls in json.loads(out.read_text()).items()}

    quiet = [step for step in range(1, 21) if step % 5]
    assert {step: counts[step] for step in quiet if step in counts} == {}
    # A logged step: one all_gather carries loss, grad norm, timings, memory, the NaN check and the stop flag.
    assert counts[5] == {"all_gather": 1} and counts[15] == {"all_gather": 1}
    # Evaluated and checkpointed steps add the evaluation's reduction and the save's own collectives.
    assert counts[10]["all_gather"] == 1 and sum(counts[10].values()) > 1

    logged = [r for r in rows(tmp_path / "hot") if "train/loss" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    assert all(r["perf/step_time_s"] > 0 and 0 <= r["perf/data_wait_frac"] < 1 for r in logged)
