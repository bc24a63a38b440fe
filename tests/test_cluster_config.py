"""cluster.yaml is a valid Ray cluster config (checked with Ray's own schema and defaults)."""

from __future__ import annotations

import re
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
    # every pod's Ray runs the encoder actors at the priority of its own services
    (head,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    for pod in (head, container):
        assert {"name": "RAY_worker_niceness", "value": "0"} in pod["env"], pod["name"]


def _ray_commands(lines: list[str]) -> list[tuple[int, str]]:
    """(index, command) of each line that runs the `ray` CLI, comments and `#` prefixes removed."""
    found = []
    for i, line in enumerate(lines):
        command = line.strip().lstrip("#").strip().split("  #")[0]
        if re.match(r"^(RAY_\w+=\S+ )*ray (up|start|job|dashboard|attach|exec|submit)\b", command):
            found.append((i, command))
    return found


def _with_token_auth(lines: list[str]) -> list[str]:
    """The ray commands of `lines` that run without token authentication in their environment."""
    exported = [i for i, line in enumerate(lines) if "export RAY_AUTH_MODE=token" in line]
    return [
        c
        for i, c in _ray_commands(lines)
        if not c.startswith("RAY_AUTH_MODE=token ") and not any(e < i for e in exported)
    ]


def test_every_ray_start_of_the_cluster_runs_with_token_authentication():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts), starts
    # Its encoder actors run at the priority of Ray's own services (`pool.RAY_SYSTEM_CONFIG`).
    assert all(re.match(r"^(RAY_\w+=\S+ )*RAY_worker_niceness=0 ray start ", c) for c in starts), starts
    # The token made on the user's machine reaches every node, where `ray start` reads it.
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    header = (REPO / "cluster.yaml").read_text().splitlines()
    assert _ray_commands(header) and not _with_token_auth(header)


def test_every_documented_ray_command_keeps_token_authentication_on():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [c for block in blocks for _, c in _ray_commands(block.splitlines())]
    assert any(c.startswith("ray up") for c in commands) and any(c.startswith("ray job submit") for c in commands)
    for block in blocks:
        assert not _with_token_auth(block.splitlines()), block
    job = yaml.safe_load((REPO / "configs" / "kuberay-rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(int(p) for p in cluster["rayVersion"].split(".")[:2]) >= (2, 52)  # token auth needs Ray 2.52


def test_the_documented_jobs_ask_the_autoscaler_for_their_gpus():
    # GPU workers that start at 0 come only for resources asked for: a job that asks for none finds
    # no GPU when it starts and runs on the head's CPUs.
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert config["available_node_types"]["gpu-worker"]["min_workers"] == 0
    header = "\n".join(line.lstrip("#") for line in (REPO / "cluster.yaml").read_text().splitlines())
    readme = (REPO / "README.md").read_text()
    for text in (header, *re.findall(r"```bash\n(.*?)```", readme, flags=re.S)):
        if "ray job submit" in text:
            assert re.search(r"jobs\.precompute[^`]*--gpus \d+", text), text
    job = yaml.safe_load((REPO / "configs" / "kuberay-rayjob.yaml").read_text())
    assert re.search(r"--gpus \d+", job["spec"]["entrypoint"])
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
