"""A real encoder actor process is SIGKILLed mid-job: its shard is retried, nothing is lost."""

from __future__ import annotations

import os
import signal
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
            for pid in encoder_pids():
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
