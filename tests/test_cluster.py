"""cluster/: the launcher YAML against Ray's own schema, the KubeRay manifest, and both against
the resources the pipeline asks for (so that pending work scales the right group)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from fusion_etl.config import load_config

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "cluster" / "aws.yaml"
KUBERAY = ROOT / "cluster" / "kuberay.yaml"


def _aws() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(AWS.read_text())
    return data


def test_launcher_yaml_validates_against_the_schema_in_the_ray_wheel() -> None:
    schema = json.loads(
        Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text()
    )
    jsonschema.validate(_aws(), schema)
    broken = {**_aws(), "max_workers": "many"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_node_types() -> None:
    cfg = _aws()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "the head does no work"
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert set(workers) == {"cpu", "gpu_extract", "gpu_train"}
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] and t["max_workers"] > 0
    assert workers["gpu_extract"]["resources"]["GPU"] == 1
    assert workers["gpu_train"]["resources"]["GPU"] == 8
    assert any('pip install -e "$HOME/fusion_etl[vllm]"' in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"] == {"~/fusion_etl": "."}


def _offering(types: dict[str, dict[str, Any]], resource: str) -> list[str]:
    return [name for name, t in types.items() if t.get("resources", {}).get(resource, 0) > 0]


def test_pipeline_requests_match_the_node_types() -> None:
    job = load_config(ROOT / "jobs" / "paper_gpu.yaml")
    types = _aws()["available_node_types"]
    # Each stage asks for a custom resource that exactly one worker type offers.
    wanted = {
        "prepare": dict(job.prepare.resources),
        "align_fuse": dict(job.align_fuse.resources),
        "extract": dict(job.extract.resources),
        "train": dict(job.train.resources),
    }
    expected_type = {
        "prepare": "cpu",
        "align_fuse": "cpu",
        "extract": "gpu_extract",
        "train": "gpu_train",
    }
    for stage, resources in wanted.items():
        assert resources, (
            f"{stage} asks for no custom resource: the autoscaler could pick any group"
        )
        for name in resources:
            assert _offering(types, name) == [expected_type[stage]], (stage, name)
    extract_node = types["gpu_extract"]["resources"]
    assert (
        job.extract.num_gpus * job.extract.actors
        <= extract_node["GPU"] * types["gpu_extract"]["max_workers"]
    )
    assert job.extract.num_gpus == job.extract.vllm.tensor_parallel_size <= extract_node["GPU"]
    train_node = types["gpu_train"]["resources"]
    assert (
        job.train.num_workers * job.train.gpus_per_worker
        <= train_node["GPU"] * types["gpu_train"]["max_workers"]
    )
    assert job.train.num_workers * job.train.resources["train_gpu"] <= train_node["train_gpu"]


def test_kuberay_manifest() -> None:
    docs = list(yaml.safe_load_all(KUBERAY.read_text()))
    assert len(docs) == 1
    rc = docs[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu-extract", "gpu-train"}
    aws_types = _aws()["available_node_types"]
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        custom = json.loads(json.loads(group["rayStartParams"]["resources"]))
        twin = aws_types[name.replace("-", "_")]["resources"]
        assert custom == {k: v for k, v in twin.items() if k not in ("CPU", "GPU")}, name
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", "0")) == twin.get("GPU", 0), name


def test_local_fake_cluster_mirrors_the_aws_cluster() -> None:
    schema = json.loads(
        Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text()
    )
    fake: dict[str, Any] = yaml.safe_load((ROOT / "cluster" / "local-fake.yaml").read_text())
    jsonschema.validate(fake, schema)
    provider = fake["provider"]
    assert provider["type"] == "fake_multinode"
    assert provider["gcs_address"].startswith("127.0.0.1:")
    assert provider["use_node_id_as_ip"] and provider["disable_node_updaters"]
    head = fake["available_node_types"][fake["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "the head does no work, as on AWS"
    workers = {k: v for k, v in fake["available_node_types"].items() if k != fake["head_node_type"]}
    aws_types = _aws()["available_node_types"]
    assert set(workers) == {k for k in aws_types if k != _aws()["head_node_type"]}
    for name, t in workers.items():
        twin = aws_types[name]["resources"]
        # The same custom resources (what the stages ask for) and GPUs declared where AWS has
        # them; the counts are a laptop's.
        assert {k for k in t["resources"] if k != "CPU"} == {k for k in twin if k != "CPU"}, name
        assert t["min_workers"] == 0 < t["max_workers"]
