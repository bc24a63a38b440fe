"""Placement and growth on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`, GPUs declared
on a CPU machine): one encoder actor per GPU, and more actors when a GPU node joins mid-run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import cluster_head

from jobs.dataset.faults import FAULT_ENV
from jobs.demo_data import write_demo_dataset
from jobs.orchestration.pool import capacity

pytestmark = pytest.mark.slow

SETTINGS = ["--set", "video.num_frames=8", "--set", "video.height=64", "--set", "video.width=64"]
# Declared GPUs resolve vae.dtype to bf16, which these CPUs run ten times slower than float32.
SETTINGS += ["--set", "vae.dtype=float32"]


@pytest.fixture
def cluster(request, monkeypatch):
    """A head with 2 CPUs and 2 GPUs; a test's `fault` mark is set in the nodes' environment (the
    actors' processes inherit the node's, not the driver's)."""
    from ray.cluster_utils import Cluster

    mark = request.node.get_closest_marker("fault")
    if mark is not None:
        monkeypatch.setenv(FAULT_ENV, mark.args[0])
    cluster = Cluster(initialize_head=True, head_node_args=cluster_head(num_cpus=2, num_gpus=2))
    yield cluster
    cluster.shutdown()


def command(data, out, cluster, shards, *extra):
    spec = f"{data}/shard-{{000000..{shards - 1:06d}}}.tar"
    return [
        sys.executable, "-m", "jobs.precompute", "--input", spec, "--output", str(out),
        "--address", cluster.address, *SETTINGS, *extra,
    ]  # fmt: skip


# Three seconds per commit: the run starts with the first actor ready, and this keeps it going until
# the other is ready too and takes shards (a second was not always enough on a loaded machine)
@pytest.mark.fault("slow-commit=3")
def test_one_encoder_actor_per_gpu_with_the_model_on_cpu_without_cuda(cluster, tmp_path):
    write_demo_dataset(tmp_path / "data", shards=4, samples_per_shard=2, seed=5)
    result = subprocess.run(command(tmp_path / "data", tmp_path / "out", cluster, 4), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 shards to encode (0 already committed), 8 samples, 2 workers" in result.stderr
    assert "encoder actors ready: 2 on cpu" in result.stderr  # one per GPU; CUDA absent, so the CPU
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(report["actors"]) == ["w0", "w1"] and report["ok"] == 8


@pytest.mark.fault("slow-commit")  # a second per commit: the run outlasts the new node's start
def test_a_gpu_node_joining_mid_run_gets_an_actor_that_takes_shards(cluster, tmp_path):
    shards = 24  # with a second per commit, the run outlasts the new node's start (a few seconds) twice over
    write_demo_dataset(tmp_path / "data", shards=shards, samples_per_shard=2, seed=6)
    out = tmp_path / "out"
    cmd = command(tmp_path / "data", out, cluster, shards, "--set", "run.scale_interval_s=0.5")
    job = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "_commits").glob("*.json")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    cluster.add_node(num_cpus=1, num_gpus=1)  # the autoscaler adds a GPU node
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert b"the cluster grew: starting 1 more encoder actors" in stderr
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["actors"]) == ["w0", "w1", "w2"] and report["ok"] == 2 * shards
    assert all(a["shards"] >= 1 for a in report["actors"].values())


def test_capacity_counts_actors_node_by_node():
    # An actor's CPUs and its GPU are on one node: a CPU-only head adds no GPU actor, and a GPU
    # node's CPUs bound its own actors (48 CPUs hold 3 of 16 beside its 4 GPUs).
    head, gpu_node = {"CPU": 16.0}, {"CPU": 48.0, "GPU": 4.0}
    assert capacity(16, [head, gpu_node], gpus=True) == 3
    assert capacity(8, [head, gpu_node], gpus=True) == 4
    assert capacity(16, [head, gpu_node], gpus=False) == 4
    assert capacity(4, [{"CPU": 2.0, "GPU": 2.0}], gpus=True) == 0


def test_a_job_asking_for_gpus_waits_for_the_first_gpu_node_then_uses_it(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=cluster_head(num_cpus=1))
    try:
        write_demo_dataset(tmp_path / "data", shards=2, samples_per_shard=2, seed=7)
        out = tmp_path / "out"
        cmd = command(tmp_path / "data", out, cluster, 2, "--gpus", "1")
        job = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert job.stderr is not None
        lines = []
        for line in job.stderr:  # the job says it waits, and waits: no actor starts on the CPU-only head
            lines.append(line)
            if "waiting for the first GPU node" in line:
                break
        assert "asked the cluster for 1 GPUs" in lines[-1], "".join(lines)[-3000:]
        time.sleep(2)
        assert job.poll() is None and not (out / "_commits").exists()
        cluster.add_node(num_cpus=1, num_gpus=1)  # what the autoscaler does for the request
        _, rest = job.communicate(timeout=300)
        stderr = "".join(lines) + rest
        assert job.returncode == 0, stderr[-3000:]
        assert "1 workers" in stderr and "encoder actors ready: 1 on cpu" in stderr
        assert json.loads((out / "report.json").read_text())["ok"] == 4
    finally:
        cluster.shutdown()


def test_a_job_asking_for_gpus_that_never_come_fails_with_the_reason(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=cluster_head(num_cpus=1))
    try:
        write_demo_dataset(tmp_path / "data", shards=1, samples_per_shard=1, seed=8)
        cmd = command(tmp_path / "data", tmp_path / "out", cluster, 1)
        cmd += ["--set", "run.gpus=2", "--set", "run.actor_start_timeout=3"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr[-3000:]
        assert "asked the cluster for 2 GPUs (run.gpus), but none joined within" in result.stderr
    finally:
        cluster.shutdown()
