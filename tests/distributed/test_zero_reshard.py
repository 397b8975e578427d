"""A DeepSpeed ZeRO checkpoint resumes on another number of workers with weights, Adam state and schedule.

Under plain torchrun (tests/distributed/ds_reshard_probe.py): every ZeRO strategy trains 3 steps of the
tests' tiny Llama on 2 ranks and on 1 rank and saves; each checkpoint is loaded on the other world size, into a
differently initialised model, and trained 2 more steps on the same global batches.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import LLAMA_SHAPE, REPO, torchrun_command

pytestmark = pytest.mark.slow

PROBE = REPO / "tests" / "distributed" / "ds_reshard_probe.py"
STRATEGIES = ["zero1", "zero2", "zero3", "zero3_offload"]


def probe(nproc: int, out: Path, actions: str) -> None:
    """Run the probe for every strategy on nproc ranks."""
    cmd = torchrun_command(str(PROBE), str(out), ",".join(STRATEGIES), actions, *LLAMA_SHAPE, nproc=nproc)
    # TMPDIR: the universal conversion's scratch folders land where the test can see they are gone.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(out / "tmp")}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The probe's output folder, after saving on 2 and on 1 rank and loading each on the other."""
    out = tmp_path_factory.mktemp("zero-reshard")
    (out / "tmp").mkdir()
    probe(2, out, "save")
    probe(1, out, "save,load2")
    probe(2, out, "load1")
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("saved_on,loaded_on", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_keeps_weights_adam_state_and_schedule(runs, strategy, saved_on, loaded_on):
    saved = torch.load(runs / strategy / f"w{saved_on}" / "saved.pt", weights_only=False)
    loaded = torch.load(runs / strategy / f"w{saved_on}" / f"loaded_on_w{loaded_on}.pt", weights_only=False)
    for key in ("module", "fp32", "exp_avg", "exp_avg_sq"):
        assert loaded[key].keys() == saved[key].keys() and saved[key], key
        for name, tensor in saved[key].items():
            assert torch.equal(loaded[key][name], tensor), (key, name)
    assert any(t.abs().sum() > 0 for t in saved["exp_avg"].values())
    assert loaded["adam_steps"] == saved["adam_steps"] == [3.0, 3.0]  # one flat partition per param group
    assert loaded["weight_decay"] == saved["weight_decay"] == [0.1, 0.0]
    assert loaded["lr"] == saved["lr"]
    assert loaded["scheduler"] == saved["scheduler"] and loaded["global_steps"] == saved["global_steps"] == 3

    # The same global batches follow: the losses match the saving run's own continuation, and a run that
    # trained on loaded_on ranks throughout, up to float summation order across ranks.
    uninterrupted = torch.load(runs / strategy / f"w{loaded_on}" / "saved.pt", weights_only=False)
    assert loaded["losses"] == pytest.approx(saved["losses"], abs=1e-4)
    assert loaded["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-4)
    assert loaded["adam_steps_after"] == [5.0, 5.0]  # each group's step counted once per step


def test_universal_conversion_leaves_no_scratch_folders(runs):
    assert list((runs / "tmp").glob("kiln-ds-*")) == []
