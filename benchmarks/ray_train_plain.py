"""The bare DDP loop of benchmarks/bare_ddp.py in a plain Ray Train TorchTrainer: Ray Train without Kiln.

    .venv/bin/python benchmarks/ray_train_plain.py SPEC.json OUT.json

SPEC.json and OUT.json as for benchmarks/bare_ddp.py. Starts a local Ray without its dashboard (as
`kiln train`'s embedded Ray: the stricter baseline, since the dashboard costs ray.init() seconds here),
runs 2 workers of 1 CPU each (gloo, the TorchTrainer's default on CPU) and shuts Ray down; the Ray Train
run is named after OUT's stem. The baseline of benchmarks/startup.py: what Kiln's startup costs beyond
Ray Train's own.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_loop(config: dict) -> None:
    """Each worker: bare_ddp.main in the process group Ray Train made."""
    sys.path.insert(0, config["repo"])
    from benchmarks.bare_ddp import main

    main(config["spec"], config["out"])


def main(spec: str, out: str) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(include_dashboard=False)
    with tempfile.TemporaryDirectory() as storage:
        TorchTrainer(
            train_loop,
            train_loop_config={
                "repo": str(REPO),
                "spec": spec,
                "out": out,
            },
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=Path(out).stem, storage_path=storage),
        ).fit()
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
