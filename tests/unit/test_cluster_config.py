"""cluster.placement and cluster.resources_per_worker: validated at startup, and what Ray Train gets."""

from __future__ import annotations

import pytest

from orchestrator.config import ClusterConfig, compose_config, config_keys, load_saved_config, to_yaml
from orchestrator.launch.ray_train import scaling_config
from tests.helpers import config_refused as refused

# The spelling of a key with a colon that Hydra's grammar takes: the colon escaped with a backslash.
H100 = r"cluster.resources_per_worker={GPU:1,accelerator_type\:H100:0.001}"


def cluster(*overrides: str) -> ClusterConfig:
    return compose_config(list(overrides)).cluster


def test_placement_defaults_to_pack_and_takes_rays_four_strategies_in_lower_case():
    assert cluster().placement == "pack"
    for placement in ("pack", "spread", "strict_pack", "strict_spread"):
        assert cluster(f"cluster.placement={placement}").placement == placement


@pytest.mark.parametrize("value", ["SPREAD", "diagonal", "''"])
def test_an_unknown_placement_names_the_key_and_the_choices(value):
    message = refused(f"cluster.placement={value}")
    assert "cluster.placement must be one of pack, spread, strict_pack, strict_spread" in message


def test_a_resource_with_a_colon_is_spelled_with_a_backslash():
    assert cluster("cluster.use_gpu=true", H100).resources_per_worker == {"GPU": 1.0, "accelerator_type:H100": 0.001}
    spaced = r"cluster.resources_per_worker={custom: 2, accelerator_type\:H100: 0.5}"
    assert cluster(spaced).resources_per_worker == {"custom": 2.0, "accelerator_type:H100": 0.5}


def test_one_resource_can_be_set_by_its_dotted_key_and_overrides_add_to_the_dict():
    assert cluster("cluster.resources_per_worker.custom=2").resources_per_worker == {"custom": 2.0}
    both = cluster("cluster.resources_per_worker={a:1}", "cluster.resources_per_worker.b=0.25")
    assert both.resources_per_worker == {"a": 1.0, "b": 0.25}
    assert cluster().resources_per_worker == {}
    assert "cluster.resources_per_worker" in config_keys() and "cluster.placement" in config_keys()


@pytest.mark.parametrize(
    "override",
    [
        "cluster.resources_per_worker={'accelerator_type:H100':0.001}",
        'cluster.resources_per_worker={GPU:1, "accelerator_type:H100":0.001}',
    ],
)
def test_a_quoted_key_is_refused_with_the_spelling_that_works(override):
    message = refused("cluster.use_gpu=true", override)
    assert message.startswith("cluster.resources_per_worker:") and r"accelerator_type\:H100" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("cluster.resources_per_worker={x:0}", "cluster.resources_per_worker.x must be a number > 0"),
        ("cluster.resources_per_worker={x:-1}", "cluster.resources_per_worker.x must be a number > 0"),
        ("cluster.resources_per_worker={x:{y:1}}", "cluster.resources_per_worker.x must be a number > 0"),
        ("cluster.resources_per_worker={x:abc}", "cluster.resources_per_worker.x: expected float, got 'abc'"),
        ("cluster.resources_per_worker={x:1e999}", "cluster.resources_per_worker.x must be a finite number"),
        ("cluster.resources_per_worker={x:null}", "cluster.resources_per_worker maps resource names to amounts"),
        ("cluster.resources_per_worker=3", "cluster.resources_per_worker maps resource names to amounts"),
        ("cluster.resources_per_worker=[1]", "cluster.resources_per_worker maps resource names to amounts"),
        ("cluster.resources_per_worker=null", "cluster.resources_per_worker maps resource names to amounts"),
        (
            "cluster.resources_per_worker={CPU:2}",
            "cluster.resources_per_worker.CPU conflicts with cluster.cpus_per_worker: set cluster.cpus_per_worker=2",
        ),
        (
            "cluster.resources_per_worker.GPU=1",
            "cluster.resources_per_worker.GPU is ignored with cluster.use_gpu=false: add cluster.use_gpu=true",
        ),
        ("cluster.resources_per_workr={x:1}", "did you mean cluster.resources_per_worker?"),
    ],
)
def test_bad_resources_name_the_key_and_what_to_do(override, expected):
    assert expected in refused(override)


def test_scaling_config_carries_placement_and_every_resource():
    plain = scaling_config(cluster())
    assert plain.placement_strategy == "PACK"
    assert plain.resources_per_worker == {"CPU": 1.0} and not plain.use_gpu and plain.num_workers == 2
    gpu = scaling_config(cluster("cluster.use_gpu=true", "cluster.cpus_per_worker=4", "cluster.placement=spread"))
    assert gpu.placement_strategy == "SPREAD" and gpu.use_gpu
    assert gpu.resources_per_worker == {"CPU": 4.0, "GPU": 1.0}
    custom = scaling_config(cluster("cluster.use_gpu=true", H100, "cluster.placement=strict_spread"))
    assert custom.placement_strategy == "STRICT_SPREAD"
    assert custom.resources_per_worker == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    two_gpus = scaling_config(cluster("cluster.use_gpu=true", "cluster.resources_per_worker.GPU=2"))
    assert two_gpus.resources_per_worker == {"CPU": 1.0, "GPU": 2.0}
    assert scaling_config(cluster("cluster.placement=strict_pack")).placement_strategy == "STRICT_PACK"


def test_placement_may_change_on_resume_and_resources_survive_the_saved_config():
    saved = to_yaml(compose_config(["cluster.use_gpu=true", H100]))
    resumed = load_saved_config(saved, ["cluster.placement=spread"], "run r").cluster
    assert resumed.placement == "spread"
    assert resumed.resources_per_worker == {"GPU": 1.0, "accelerator_type:H100": 0.001}


def test_an_elastic_worker_range_reaches_ray_train_as_min_max_and_keeps_the_global_batch():
    elastic = cluster("cluster.num_workers=[1,2]", "cluster.resize_check_s=5")
    assert (elastic.elastic, elastic.min_workers, elastic.max_workers) == (True, 1, 2)
    scaling = scaling_config(elastic)
    assert scaling.num_workers == (1, 2) and scaling.elastic_resize_monitor_interval_s == 5
    fixed = cluster("cluster.num_workers=2")
    assert not fixed.elastic and scaling_config(fixed).num_workers == 2
    assert cluster("cluster.num_workers=[2,2]").num_workers == 2  # a range of one count is that count
    # Every count in the range must keep train.global_batch exact by accumulation.
    message = refused("train.global_batch=16", "train.micro_batch=8", "cluster.num_workers=[1,3]")
    assert "cluster.num_workers (3)" in message and "from 1 to 3" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["cluster.num_workers=[2,1]"], "0 < MIN <= MAX"),
        (["cluster.num_workers=[0,2]"], "0 < MIN <= MAX"),
        (["cluster.num_workers=[1,2,4]"], "N or [MIN,MAX]"),
        (["cluster.num_workers=0"], "cluster.num_workers must be > 0"),
        (["cluster.resize_check_s=5"], "is ignored with a fixed cluster.num_workers=2"),
        (["cluster.num_workers=[1,2]", "cluster.resize_check_s=0"], "cluster.resize_check_s must be > 0"),
    ],
)
def test_a_bad_elastic_setting_is_refused_naming_it(overrides, expected):
    assert expected in refused(*overrides)
