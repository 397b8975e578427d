"""The deployment recipes stay true to the code: the image runs pyproject.toml's Ray and Python, and
the cluster-launcher config passes Ray's own validator (a typo in a field fails here, not in `ray up`)."""

from __future__ import annotations

import copy
import re
import tomllib

import pytest
import yaml

from tests.helpers import REPO

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
AWS_CLUSTER = REPO / "deploy" / "cluster-launcher" / "aws.yaml"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    """The version pyproject.toml pins for package (extras ignored)."""
    for requirement in pyproject()["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        if re.sub(r"\[.*\]", "", name) == package:
            return version
    raise AssertionError(f"pyproject.toml pins no {package}")


def test_the_image_runs_the_ray_and_python_that_pyproject_pins():
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert base, "the Dockerfile must build FROM rayproject/ray:<ray>-py<python>-gpu"
    ray_version, major, minor = base.groups()
    assert ray_version == pinned("ray")
    assert f">={major}.{minor}," in pyproject()["project"]["requires-python"]


def test_the_image_holds_every_package_and_the_config_groups_it_reads():
    text = DOCKERFILE.read_text()
    packages = [p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]]
    for folder in [*packages, "conf"]:
        assert re.search(rf"^COPY .*\b{folder} {folder}$", text, re.MULTILINE), f"{folder}/ is not copied"
    conf_dir = re.search(r"KILN_CONF_DIR=(\S+)", text)
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.MULTILINE)
    assert conf_dir and workdir and conf_dir.group(1) == f"{workdir.group(1)}/conf"
    assert not re.search(r"AWS_SECRET|AWS_ACCESS_KEY|WANDB_API_KEY=", text), "no credentials in the image"


def cluster_config() -> dict:
    return yaml.safe_load(AWS_CLUSTER.read_text())


def validated(config: dict) -> dict:
    """The config as `ray up` sees it: Ray's defaults filled in, then Ray's schema and checks applied."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


def test_the_aws_cluster_passes_rays_own_validator():
    full = validated(cluster_config())
    assert full["docker"]["image"].endswith(f"/kiln:{pyproject()['project']['version']}")
    workers = full["available_node_types"]["gpu_h100"]
    assert workers["max_workers"] >= 1 and "accelerator_type:H100" in workers["resources"]


def test_a_misspelled_field_fails_rays_validator():
    import jsonschema

    config = cluster_config()
    config["available_node_types"]["gpu_h100"]["max_wrkers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="max_wrkers"):
        validated(config)


def test_the_jobs_api_listens_on_the_heads_loopback_only():
    # The Jobs API runs anyone's code: reached through `ray dashboard` (an SSH tunnel), never an open port.
    head = " ".join(cluster_config()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


KUBERAY = REPO / "deploy" / "kuberay"
# KubeRay v1.7.0's CRD schemas (the served v1 openAPIV3Schema of each), vendored with KubeRay's license.
SCHEMAS = REPO / "tests" / "kuberay"


def strict(schema: dict) -> dict:
    """schema with unknown fields refused wherever Kubernetes would drop them (`kubectl --validate=strict`).

    A CRD schema lists each object's fields but does not forbid others: the API server prunes them
    silently, so a misspelled field would vanish from a manifest instead of failing.
    """
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def check_manifest(manifest: dict) -> None:
    """Validate a KubeRay manifest against its kind's vendored CRD schema, strictly."""
    import json

    import jsonschema

    assert manifest["apiVersion"] == "ray.io/v1"
    schema = json.loads((SCHEMAS / f"{manifest['kind']}.v1.schema.json").read_text())
    body = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind", "metadata")}
    jsonschema.validate(body, strict({**schema, "properties": {"spec": schema["properties"]["spec"]}}))


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_the_raycluster_fits_kuberays_schema_and_keeps_its_secrets_and_jobs_api_private():
    cluster = manifest("raycluster.yaml")
    check_manifest(cluster)
    spec = cluster["spec"]
    assert spec["rayVersion"] == pinned("ray")
    assert spec["authOptions"]["mode"] == "token" and spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    for container in containers(spec):
        assert container["image"].endswith(f"/kiln:{pyproject()['project']['version']}")
        assert {"secretRef": {"name": "kiln-credentials"}} in container["envFrom"]
        assert not any(re.search(r"KEY|SECRET|TOKEN", e["name"]) for e in container.get("env", []))


def test_a_misspelled_field_in_a_manifest_fails_the_schema():
    import jsonschema

    cluster = manifest("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        check_manifest(cluster)


def test_the_rayjob_fits_kuberays_schema_and_its_entrypoint_is_a_valid_kiln_train():
    import shlex

    from orchestrator.config import compose_config

    job = manifest("rayjob.yaml")
    check_manifest(job)
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == manifest("raycluster.yaml")["metadata"]["name"]
    command, subcommand, *overrides = shlex.split(job["spec"]["entrypoint"])
    assert (command, subcommand) == ("kiln", "train")
    cfg = compose_config(overrides)
    assert cfg.storage.root.startswith("s3://") and cfg.cluster.use_gpu and cfg.checkpoint.async_upload


def test_a_typo_in_the_rayjobs_entrypoint_fails_here():
    import shlex

    from orchestrator.config import UsageError, compose_config

    overrides = shlex.split(manifest("rayjob.yaml")["spec"]["entrypoint"])[2:]
    with pytest.raises(UsageError, match="train.max_step"):
        compose_config([o.replace("train.max_steps=", "train.max_step=") for o in overrides])
