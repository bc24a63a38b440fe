"""A real encoder actor process is SIGKILLed mid-job: its shard is retried, nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import encoder_pids, small_config

from jobs.dataset.reader import read_metadata
from jobs.demo_data import write_demo_dataset
from jobs.orchestration.driver import run

pytestmark = pytest.mark.slow


def test_killed_actor_is_replaced_and_its_shard_redone(ray_cluster, tmp_path):
    shards = write_demo_dataset(tmp_path / "data", shards=4, samples_per_shard=4, seed=3)
    killed: list[int] = []

    def kill_one_busy_actor() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for pid in encoder_pids(ancestor=os.getpid()):  # this session's embedded Ray only
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_busy_actor)
    killer.start()
    summary = run(small_config(shards, tmp_path / "out"))
    killer.join()
    assert killed, "no encoder actor was seen running a shard"
    assert summary.complete and summary.shards_written == 4
    rows = read_metadata(tmp_path / "out").to_pylist()
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert summary.ok == 16  # the killed attempt's partial progress was not double counted
    assert not list((tmp_path / "out").rglob("*.tmp"))


UNAVAILABLE = """
import dataclasses
import sys
from conftest import small_config
from jobs.dataset.catalog import read_commit
from jobs.demo_data import write_demo_dataset
from jobs.inputs import decode_pool, forkserver
from jobs.orchestration.driver import prepare_output
from jobs.orchestration.settings import check_config, make_plan
from jobs.orchestration.actor import EncoderActor

root = sys.argv[1]
shards = write_demo_dataset(root + "/data", shards=1, samples_per_shard=2, seed=3)
config = small_config(shards, root + "/out")
plan = make_plan(config, check_config(config), has_gpus=False)
prepare_output(plan)
forkserver.CONTEXT.set_executable(root + "/no-python")  # no decoding process can start
actor = EncoderActor(dataclasses.asdict(plan.config), str(plan.root), plan.constants)  # starts all the same
try:
    list(actor.encode_shard(plan.shards[0]))
except decode_pool.DecodeUnavailable as e:
    print("raised:", e)
print("committed:", read_commit(plan.root, plan.shards[0].name) is not None)
"""


def test_decoding_processes_that_cannot_start_fail_the_attempt_not_the_samples(tmp_path):
    """The worker's failure, not the samples': the actor still starts, and the shard's attempt
    raises (the driver retries it elsewhere) instead of committing every sample as an error row."""
    tests = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, "-c", UNAVAILABLE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raised: no decoding process can be started" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "committed: False" in result.stdout
