"""`ray job submit` against a real head node started with `ray start --head`."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_session

from jobs.dataset.reader import read_metadata

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """A one-node Ray cluster in its own session, with token authentication, torn down after."""
    bin_dir = Path(sys.executable).parent
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in the entrypoint
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_worker_niceness": "0",  # as cluster.yaml starts every node
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = f"http://127.0.0.1:{_free_port()}"
    # Every service on a port of its own: the session's embedded cluster (other tests) already
    # holds Ray's default ports, e.g. the dashboard agent's 52365, and a clash leaves the head
    # without a job agent ("No available agent to submit job").
    ports = [
        f"--{name}={_free_port()}"
        for name in (
            "port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    ]
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--dashboard-host=127.0.0.1", *ports]
        + [f"--dashboard-port={dashboard.rsplit(':', 1)[1]}", "--num-cpus=2", "--disable-usage-stats", "--block"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            ready = subprocess.run(
                [str(bin_dir / "ray"), "job", "list", "--address", dashboard], env=env, capture_output=True
            )
            if ready.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, ready.stderr.decode()[-2000:]
            time.sleep(1)
        yield dashboard, env
    finally:
        kill_session(head.pid)
        head.wait()


def test_ray_job_submit_joins_the_cluster(head_node, demo_shards, tmp_path):
    dashboard, env = head_node
    # Token authentication is really on: a client with another token is turned away.
    ray_cli = str(Path(sys.executable).parent / "ray")
    stranger = subprocess.run(
        [ray_cli, "job", "list", "--address", dashboard],
        env={**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)},
        capture_output=True,
    )
    assert stranger.returncode != 0 and b"Invalid authentication token" in stranger.stderr, stranger.stderr[-2000:]
    out = tmp_path / "latents"
    spec = str(demo_shards[0].parent / "shard-{000000..000002}.tar")
    command = (
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(REPO)]
        + ["--", "python", "-m", "jobs.precompute", "--input", spec, "--output", str(out)]
        + ["--set", "video.num_frames=8", "--set", "video.height=64", "--set", "video.width=64"]
    )
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        log = submit.stdout + submit.stderr
        # The dashboard can answer before the node's job agent is up; Ray says to try again then.
        if "No available agent to submit job" not in log or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, log[-3000:]
    assert "joined the Ray cluster at" in log  # the driver used the head node, not an embedded cluster
    assert "12 ok, 0 errors" in log and "succeeded" in log
    rows = read_metadata(out).to_pylist()
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
