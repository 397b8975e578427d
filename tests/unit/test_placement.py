"""More workers than the cluster can ever place fail at once, naming the settings and the cluster."""

from __future__ import annotations

from orchestrator.cluster.placement import placement_problem

LAPTOP = [{"CPU": 2.0, "memory": 8e9, "node:127.0.0.1": 1.0}]


def test_64_workers_on_a_2_cpu_embedded_ray_are_refused_with_the_fix():
    problem = placement_problem(64, 1, False, LAPTOP)
    assert problem is not None and "\n" not in problem
    for words in (
        "cluster.num_workers=64",
        "cluster.cpus_per_worker=1",
        "2 CPUs",
        "room for 2",
        "cluster.num_workers=2 or less",
    ):
        assert words in problem, (words, problem)


def test_workers_that_fit_pass():
    assert placement_problem(2, 1, False, LAPTOP) is None
    assert placement_problem(4, 2, True, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 2.0}]) is None


def test_gpu_workers_on_a_cluster_without_gpus_are_refused():
    problem = placement_problem(1, 1, True, [{"CPU": 16.0}])
    assert "cluster.use_gpu=true" in problem and "0 GPUs" in problem and "cluster.use_gpu=false" in problem


def test_a_worker_never_spans_nodes():
    problem = placement_problem(2, 3, False, [{"CPU": 2.0}, {"CPU": 2.0}])
    assert "4 CPUs" in problem and "2 nodes" in problem and "cluster.cpus_per_worker=2 or less" in problem
    assert placement_problem(2, 2, False, [{"CPU": 2.0}, {"CPU": 2.0}]) is None


H100_NODE = {"CPU": 8.0, "GPU": 4.0, "accelerator_type:H100": 1.0, "node:10.0.0.1": 1.0, "memory": 6.4e10}
A100_NODE = {"CPU": 8.0, "GPU": 4.0, "accelerator_type:A100": 1.0, "node:10.0.0.2": 1.0}


def test_a_resource_no_node_has_is_named_with_what_the_nodes_offer():
    problem = placement_problem(1, 1, True, [A100_NODE], extra={"accelerator_type:H100": 0.001})
    assert problem is not None and "\n" not in problem
    assert "cluster.resources_per_worker.accelerator_type:H100=0.001" in problem
    assert "accelerator_type:A100 (1)" in problem and "GPU (4)" in problem
    assert "node:10.0.0.2" not in problem  # Ray's per-node markers are no resource a user asks for


def test_fractional_custom_resources_share_a_node_the_way_ray_counts_them():
    h100 = {"accelerator_type:H100": 0.001}
    assert placement_problem(8, 1, True, [H100_NODE, A100_NODE], extra={"GPU": 1.0}) is None
    assert placement_problem(4, 1, True, [H100_NODE, A100_NODE], extra=h100) is None
    problem = placement_problem(5, 1, True, [H100_NODE, A100_NODE], extra=h100)
    assert "room for 4" in problem and "cluster.num_workers=4 or less" in problem
    # 1.0 // 0.1 is 9 in floats; Ray's fixed point gives the 10 workers room
    assert placement_problem(10, 0.1, False, [{"CPU": 1.0}]) is None


def test_more_gpus_per_worker_than_a_node_has_asks_for_fewer():
    problem = placement_problem(1, 1, True, [{"CPU": 8.0, "GPU": 2.0}], extra={"GPU": 4.0})
    assert "4 GPUs" in problem and "cluster.resources_per_worker.GPU=2 or less" in problem


def test_resources_that_never_meet_on_one_node_are_said_so():
    nodes = [{"CPU": 8.0}, {"CPU": 1.0, "custom": 1.0}]
    problem = placement_problem(1, 2, False, nodes, extra={"custom": 1.0})
    assert "cluster.resources_per_worker={custom:1}" in problem
    assert "room for 0" in problem and "cluster.cpus_per_worker=1 or less" in problem  # the node with custom
    apart = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "accelerator_type:H100": 1.0}]
    problem = placement_problem(1, 1, True, apart, extra={"accelerator_type:H100": 0.5})
    assert r"cluster.resources_per_worker={accelerator_type\:H100:0.5}" in problem
    assert "no single node has 1 GPU and 0.5 accelerator_type:H100 at once" in problem


def test_spread_is_best_effort_like_ray_and_strict_spread_needs_a_node_per_worker():
    one_node = [{"CPU": 8.0}]
    assert placement_problem(4, 1, False, one_node, placement="spread") is None
    assert placement_problem(1, 1, False, one_node, placement="strict_spread") is None
    problem = placement_problem(3, 1, False, [{"CPU": 8.0}, {"CPU": 8.0}, {"CPU": 0.5}], placement="strict_spread")
    assert problem is not None and "\n" not in problem
    for words in ("cluster.placement=strict_spread", "only 2 of the 3 nodes", "cluster.num_workers=2 or less"):
        assert words in problem, (words, problem)
    assert "cluster.placement=spread" in problem
    assert placement_problem(3, 1, False, [{"CPU": 1.0}] * 3, placement="strict_spread") is None


def test_strict_pack_needs_one_node_for_all_workers():
    nodes = [{"CPU": 4.0}, {"CPU": 4.0}]
    assert placement_problem(8, 1, False, nodes, placement="pack") is None
    problem = placement_problem(8, 1, False, nodes, placement="strict_pack")
    for words in ("cluster.placement=strict_pack", "at most 4", "cluster.num_workers=4 or less", "placement=pack"):
        assert words in problem, (words, problem)
    assert placement_problem(4, 1, False, nodes, placement="strict_pack") is None


def test_a_cluster_too_small_overall_is_said_before_the_strict_rule():
    problem = placement_problem(64, 1, False, LAPTOP, placement="strict_spread")
    assert "room for 2" in problem and "cluster.num_workers=2 or less" in problem
