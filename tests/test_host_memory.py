"""`run.reuse_host_memory`: the encoder's process keeps freed host memory for the next batch instead
of faulting it in again, page by page, from the kernel (jobs/orchestration/host_memory.py)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# In a process of its own (the allocator's settings are the whole process's, and cannot be undone):
# the page faults of this process while an in-process encoder, as an actor holds one, encodes two
# shards after a first one (the model's buffers all allocated once).
ENCODE = """
import json, resource, sys
from conftest import in_process_encoder, small_config

shards, out, reuse = sys.argv[1].split(","), sys.argv[2], sys.argv[3] == "1"
encoder, plan = in_process_encoder(small_config(shards, out, run={"reuse_host_memory": reuse, "batch_size": 2}))
try:
    first, *rest = plan.shards
    list(encoder.encode_shard(first))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for shard in rest:
        list(encoder.encode_shard(shard))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
finally:
    encoder.decoder.close()
print(json.dumps({"faults": faults}))
"""


def _faults(shards: list[Path], out: Path, reuse: bool) -> int:
    done = subprocess.run(
        [sys.executable, "-c", ENCODE, ",".join(map(str, shards)), str(out), "1" if reuse else "0"],
        cwd=REPO / "tests",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["faults"]


def test_the_encoder_reuses_freed_host_memory_instead_of_faulting_it_in_at_every_batch(demo_shards, tmp_path):
    # glibc's defaults hand the activations' memory back at every layer and fault it in again: tens
    # of thousands of page faults for 8 clips (measured 60 to 83 thousand, against 0.7 to 9 thousand).
    reused = _faults(demo_shards, tmp_path / "reused", reuse=True)
    default = _faults(demo_shards, tmp_path / "default", reuse=False)
    assert reused * 5 < default, (reused, default)


def test_the_allocator_is_set_where_the_c_library_is_glibc():
    # (in a process of its own: the settings are the whole process's, and would stay with this one)
    code = "from jobs.orchestration.host_memory import reuse_freed_memory; print(reuse_freed_memory())"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(platform.libc_ver()[0] == "glibc")]
