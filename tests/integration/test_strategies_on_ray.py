"""The same switch works under Ray Train workers: FSDP2 and ZeRO-3 runs agree step by step."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, kiln

pytestmark = pytest.mark.slow


def test_fsdp_and_zero3_under_ray_train_agree(tmp_path, cache_dir):
    losses = {}
    for strategy in ("fsdp", "zero3"):
        result = kiln("train", "experiment=quickstart", *TINY, f"strategy={strategy}", f"run.id={strategy}",
                      f"storage.root={tmp_path}", "train.max_steps=6", "train.eval_every=6",
                      "train.checkpoint_every=6", "tracker=none", "cluster.max_failures=0", timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
        losses[strategy] = [r["train/loss"] for r in rows if "train/loss" in r]
        manifest = json.loads((tmp_path / strategy / "checkpoints" / "step_000006" / "MANIFEST.json").read_text())
        assert manifest["strategy"] == strategy and manifest["world_size"] == 2
    assert len(losses["fsdp"]) == 6
    assert losses["zero3"] == pytest.approx(losses["fsdp"], rel=1e-4)
