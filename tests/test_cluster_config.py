"""cluster.yaml is a valid Ray cluster config (checked with Ray's own schema and defaults)."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_ray_up():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    workers = prepared["available_node_types"]["gpu-worker"]
    assert workers["max_workers"] <= prepared["max_workers"]
    assert any("pip install" in c for c in prepared["setup_commands"])


def test_cluster_yaml_brings_the_weights_to_every_node():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert "/home/ubuntu/weights" in config["file_mounts"]


def test_the_kuberay_job_runs_the_precompute_with_one_gpu_group():
    job = yaml.safe_load((REPO / "configs" / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("python -m jobs.precompute ")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8" and group["maxReplicas"] >= group["minReplicas"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/shared" in mounts and "/shared/latents" in job["spec"]["entrypoint"]
