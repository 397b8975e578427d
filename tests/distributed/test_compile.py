"""model.compile: each transformer block compiled, under ddp, fsdp (with activation checkpointing) and zero2, trains
with the uncompiled run's losses (to 1e-4: compiled kernels may round differently in the last bits).

Dropout is off in these runs: compiled dropout draws its masks with inductor's own generator, not eager torch's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY, rows, torchrun

pytestmark = pytest.mark.slow

RUN = [*TINY, "tracker=none", "model.dropout=0.0", "train.max_steps=6", "train.checkpoint_every=6"]
RUN += ["train.eval_every=6"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows(run_dir) if "train/loss" in r}


@pytest.fixture(scope="module")
def uncompiled(tmp_path_factory) -> dict[int, float]:
    """The losses of the uncompiled ddp run."""
    root = tmp_path_factory.mktemp("eager")
    torchrun(*RUN, "strategy=ddp", "run.id=eager", f"storage.root={root}")
    return losses(root / "eager")


@pytest.mark.parametrize(
    "strategy, extra",
    [("ddp", []), ("fsdp", ["model.activation_checkpointing=true"]), ("zero2", [])],
    ids=["ddp", "fsdp-checkpointed", "zero2"],
)
def test_compiled_blocks_train_with_the_uncompiled_losses(uncompiled, strategy, extra, tmp_path):
    torchrun(*RUN, f"strategy={strategy}", "model.compile=true", *extra, "run.id=compiled", f"storage.root={tmp_path}")
    compiled = losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, 7))
    for step, loss in compiled.items():
        assert loss == pytest.approx(uncompiled[step], rel=1e-4), step
    manifest = json.loads((tmp_path / "compiled" / "checkpoints" / "step_000006" / "MANIFEST.json").read_text())
    assert manifest["strategy"] == strategy
