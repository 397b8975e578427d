"""More workers than the cluster can ever place fail at once, naming the settings and the cluster."""

from __future__ import annotations

from orchestrator.placement import placement_problem

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
