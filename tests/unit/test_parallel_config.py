"""parallel.tensor and parallel.replicate: the mesh a run's world is laid out as, and every setting it refuses
(one line naming the fix) before anything starts."""

from __future__ import annotations

import pytest

from orchestrator.config import compose_config
from tests.helpers import config_refused as refused
from trainers.config import MeshShape

# A Llama-family model whose 4 query and 2 key/value heads split 2 ways.
LLAMA = ["model=llama3_tiny", "strategy=fsdp", "train.global_batch=8", "train.micro_batch=2"]


def test_the_mesh_is_replicate_by_shard_by_tensor_with_tensor_groups_of_consecutive_ranks():
    mesh = compose_config([*LLAMA, "cluster.num_workers=8", "parallel.tensor=2", "parallel.replicate=2"]).mesh(8)
    assert mesh == MeshShape(replicate=2, shard=2, tensor=2) and mesh.data_parallel == 4
    assert [mesh.coordinates(rank) for rank in (0, 1, 2, 5, 7)] == [
        {"replicate": 0, "shard": 0, "tensor": 0},
        {"replicate": 0, "shard": 0, "tensor": 1},
        {"replicate": 0, "shard": 1, "tensor": 0},
        {"replicate": 1, "shard": 0, "tensor": 1},
        {"replicate": 1, "shard": 1, "tensor": 1},
    ]
    assert [mesh.data_rank(rank) for rank in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # a tensor group reads one batch
    assert compose_config(LLAMA).mesh(4) == MeshShape(1, 4, 1) and MeshShape(1, 4, 1).is_trivial


def test_the_batch_is_divided_among_data_parallel_ranks_not_workers():
    cfg = compose_config([*LLAMA, "cluster.num_workers=4", "parallel.tensor=2"])
    assert cfg.grad_accum == 2  # 8 sequences over 2 data-parallel ranks of 2 sequences each
    message = refused(*LLAMA, "train.global_batch=6", "cluster.num_workers=4", "parallel.tensor=2")
    assert "train.global_batch=6 is not divisible by train.micro_batch (2) x " in message
    assert "cluster.num_workers / parallel.tensor (2) = 4" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["strategy=ddp", "parallel.tensor=2", "cluster.num_workers=2"],
            "with strategy=ddp: the mesh composes with FSDP2 only; use strategy=fsdp",
        ),
        (
            ["strategy=zero3", "parallel.replicate=2", "cluster.num_workers=2"],
            "with strategy=zero3: the mesh composes with FSDP2 only; use strategy=fsdp",
        ),
        (
            ["parallel.tensor=2", "cluster.num_workers=3"],
            "parallel.replicate (1) x parallel.tensor (2) = 2 must divide the 3 workers (cluster.num_workers)",
        ),
        (
            ["parallel.tensor=4", "cluster.num_workers=4"],
            "parallel.tensor=4 must divide the 4 query and 2 key/value heads (model.n_head/model.n_kv_head)",
        ),
        (
            ["parallel.tensor=2", "cluster.num_workers=2", "model.lora.r=8", "model.init_from=/models/base"],
            "parallel.tensor=2 with model.lora: peft's adapters do not shard across a tensor group",
        ),
        (
            ["parallel.tensor=2", "cluster.num_workers=2", "cluster.num_workers=[1,2]"],
            "(elastic) with parallel.tensor/parallel.replicate: a mesh has a fixed shape",
        ),
        (
            ["parallel.tensor=2", "cluster.num_workers=2", "model.compile=true"],
            "model.compile with parallel.tensor=2: Kiln does not compile tensor-parallel blocks",
        ),
        (["parallel.tensor=0"], "parallel.tensor must be >= 1 (1: off), got 0"),
        (["parallel.replicate=-2"], "parallel.replicate must be >= 1 (1: off), got -2"),
    ],
)
def test_a_mesh_that_cannot_work_is_refused_naming_the_fix(overrides, expected):
    model = LLAMA if "model.init_from=/models/base" not in overrides else LLAMA[1:]  # the folder decides the model
    assert expected in refused(*model, *overrides)


def test_tensor_parallel_needs_a_planned_decoder_and_a_causal_task():
    gpt2 = refused("strategy=fsdp", "parallel.tensor=2", "cluster.num_workers=2")
    assert (
        "parallel.tensor=2 with model.arch=gpt2: Kiln has tensor-parallel plans for llama, qwen2, qwen3, mistral"
        in gpt2
    )
    moe = refused("model=qwen3_moe_tiny", "strategy=fsdp", "parallel.tensor=2", "cluster.num_workers=2")
    assert "with model.arch=qwen3_moe" in moe
    labels = ["task=classification", "task.labels=[a,b]"]
    classify = refused(*LLAMA, *labels, "parallel.tensor=2", "cluster.num_workers=2")
    assert "parallel.tensor=2 with task=classification: tensor parallel splits a causal LM" in classify
    # HSDP alone shards any model FSDP2 does.
    hsdp = compose_config(["strategy=fsdp", "parallel.replicate=2", "cluster.num_workers=4", "train.global_batch=32"])
    assert hsdp.mesh(4) == MeshShape(replicate=2, shard=2, tensor=1)


def test_a_tensor_group_must_share_a_node():
    from trainers.config.parallel import tensor_group_problem

    mesh = MeshShape(replicate=1, shard=2, tensor=2)
    assert tensor_group_problem(mesh, ["a", "a", "b", "b"]) is None
    problem = tensor_group_problem(mesh, ["a", "a", "a", "b"])
    assert problem and problem.startswith("tensor group of ranks 2-3 spans nodes a, b: each node must hold a multiple")
    spread = refused(*LLAMA, "parallel.tensor=2", "cluster.num_workers=2", "cluster.placement=spread")
    assert "parallel.tensor=2 with cluster.placement=spread: a tensor group must share a node" in spread


def test_the_mesh_may_change_on_resume():
    from orchestrator.config.keys import RESUME_SAFE_KEYS

    assert {"parallel.tensor", "parallel.replicate"} <= set(RESUME_SAFE_KEYS)
