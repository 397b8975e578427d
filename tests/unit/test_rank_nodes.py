"""Where each rank ran: Ray's full node id and address go from the worker to run.json and `kiln status`."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

from orchestrator.cli import main
from orchestrator.run.attempts import apply_event, describe_ranks
from orchestrator.run.registry import RunRecord, RunRegistry
from trainers.loop import identity

NODE_ID = "8f1c0e5d2b7a4c3e9d6f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f"


def ray_ctx(rank: int, address: str) -> SimpleNamespace:
    return SimpleNamespace(
        rank=rank, node_id=NODE_ID, node_address=address, node=f"{address} ({NODE_ID[:12]})", launcher="ray"
    )


def test_a_ray_rank_names_its_full_node_id_and_address_and_torchrun_its_host():
    ray_rank = identity(ray_ctx(1, "10.0.0.7"))
    assert ray_rank == {
        "rank": 1,
        "node": f"10.0.0.7 ({NODE_ID[:12]})",
        "node_id": NODE_ID,
        "node_address": "10.0.0.7",
        "pid": os.getpid(),
    }
    torchrun_rank = identity(SimpleNamespace(rank=0, launcher="torchrun"))
    assert torchrun_rank == {"rank": 0, "node": socket.gethostname(), "pid": os.getpid()}


def started(ranks: list[dict]) -> dict:
    return {"kind": "started", "utc": "2025-01-01T00:00:01Z", "world_size": len(ranks), "ranks": ranks}


def test_status_prints_each_rank_of_the_latest_attempt_and_json_keeps_the_ids(tmp_path, capsys):
    registry = RunRegistry(str(tmp_path))
    record = registry.create(RunRecord(run_id="r1", max_steps=4, num_workers=2), "run: {}\n")
    first = [identity(ray_ctx(0, "10.0.0.1")) | {"pid": 11}]
    latest = [identity(ray_ctx(0, "10.0.0.1")) | {"pid": 21}, {"rank": 1, "node": "worker-host", "pid": 22}]
    apply_event(record, {"kind": "launched", "launcher": "ray", "utc": "2025-01-01T00:00:00Z"})
    apply_event(record, started(first))
    apply_event(record, started(latest))  # Ray restarted the group
    registry.save(record)

    assert main(["status", "r1", "--storage-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ranks = [line for line in lines if line.startswith("    rank ")]
    assert ranks == [
        f"    rank 0: node {NODE_ID} (10.0.0.1), pid 21",
        "    rank 1: node worker-host, pid 22",  # no node id: the node as recorded
    ]
    assert lines.index(ranks[0]) == 1 + max(i for i, line in enumerate(lines) if line.startswith("  attempt 2:"))

    assert main(["status", "r1", "--storage-root", str(tmp_path), "--json"]) == 0
    attempts = json.loads(capsys.readouterr().out)["attempts"]
    assert attempts[-1]["ranks"][0]["node_id"] == NODE_ID and attempts[-1]["ranks"][0]["node_address"] == "10.0.0.1"
    assert attempts[0]["ranks"][0]["pid"] == 11


def test_an_attempt_without_ranks_has_no_rank_lines():
    assert describe_ranks({"n": 1}) == []
    assert describe_ranks({"ranks": [{"rank": 0}]}) == ["rank 0: node ?, pid ?"]
