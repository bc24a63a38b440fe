"""`EncoderActor`: the decoding processes' fork server starts before the actor imports torch, so
the two imports run side by side (its arguments, as the pool builds them, import nothing heavy);
and the actor then encodes like `ShardEncoder`, its first shard read while it started."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from conftest import small_config

from jobs.dataset.catalog import read_commit
from jobs.demo_data import write_demo_dataset
from jobs.orchestration.driver import prepare_output
from jobs.orchestration.pool import actor_args
from jobs.orchestration.settings import check_config, make_plan

SCRIPT = """
import json, sys
import multiprocessing.forkserver as forkserver

server_at_torch = []


class Watch:  # notes whether the fork server runs when torch is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not server_at_torch:
            server_at_torch.append(forkserver._forkserver._forkserver_pid)
        return None


sys.meta_path.insert(0, Watch())
from jobs.orchestration.actor import EncoderActor

print("torch after the import:", "torch" in sys.modules)
args = json.load(open(sys.argv[1]))  # what Ray hands the constructor: plain data
actor = EncoderActor(*args)
print("fork server at torch:", server_at_torch[0] is not None)
from jobs.orchestration.worker import Progress, ShardDone
from jobs.inputs.shards import Shard

done = [m for m in actor.encode_shard(Shard(**json.load(open(sys.argv[2])))) if isinstance(m, ShardDone)]
print("committed:", done[0].marker["ok"])
print("read while the actor started:", done[0].read_ahead)
"""


def test_the_fork_server_starts_before_torch_is_imported_and_the_actor_encodes(tmp_path):
    shards = write_demo_dataset(tmp_path / "data", shards=1, samples_per_shard=2, seed=2)
    config = small_config(shards, tmp_path / "out")
    plan = make_plan(config, check_config(config), has_gpus=False)
    prepare_output(plan)
    # as the pool creates its first actors: each is given the shard it will encode first
    (tmp_path / "args.json").write_text(json.dumps(actor_args(plan, plan.shards[0])))
    (tmp_path / "shard.json").write_text(json.dumps(dataclasses.asdict(plan.shards[0])))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "args.json"), str(tmp_path / "shard.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "torch after the import: False" in lines  # the actor's module is light
    assert "fork server at torch: True" in lines  # started first: its imports overlap the actor's
    assert "committed: 2" in lines and read_commit(plan.root, plan.shards[0].name) is not None
    assert "read while the actor started: 2" in lines


PRIORITY_SCRIPT = """
import os, ray
from jobs.orchestration.pool import connect

assert connect(None)  # an embedded cluster, as a local run starts one
worker = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
print("priorities:", os.getpriority(os.PRIO_PROCESS, 0), worker)
"""


def test_the_embedded_clusters_workers_run_at_the_drivers_priority():
    """Ray would start them at nice 15, below its own services and the driver, whose frequent
    wakeups then stall the model's threads (`pool.RAY_SYSTEM_CONFIG`)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-c", PRIORITY_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("priorities:")]
    _, driver, worker = line.split()
    assert worker == driver
