"""Kill a real run after some shards are committed, rerun it, and compare with a clean run."""

from __future__ import annotations

import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import kill_session

from jobs.demo_data import write_demo_dataset

pytestmark = pytest.mark.slow

SETTINGS = ["--workers", "1", "--set", "video.num_frames=8", "--set", "video.height=64", "--set", "video.width=64"]


def _command(data, out):
    return [
        sys.executable,
        "-m",
        "jobs.precompute",
        "--input",
        f"{data}/shard-{{000000..000005}}.tar",
        "--output",
        str(out),
    ]


def _files(root):
    return {
        str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".tar", ".parquet")
    }


def test_killed_run_resumes_to_the_output_of_a_clean_run(tmp_path):
    data = tmp_path / "data"
    write_demo_dataset(data, shards=6, samples_per_shard=3, seed=0)
    out, clean = tmp_path / "resumed", tmp_path / "clean"

    # Start the job in its own session (driver + embedded Ray + actors) and kill all of it,
    # without warning, once two shards are committed.
    first = subprocess.Popen(
        _command(data, out) + SETTINGS, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if len(list((out / "_commits").glob("*.json"))) >= 2:
            break
        time.sleep(0.1)
    kill_session(first.pid)
    first.wait()
    committed = {p.stem for p in (out / "_commits").glob("*.json")}
    assert 2 <= len(committed) < 6, f"expected an interrupted run, got {len(committed)} committed shards"
    visible = _files(out)
    # Whatever was killed mid-write is invisible: every visible data file belongs to a committed shard.
    assert {rel.split("/", 1)[1].rsplit(".", 1)[0] for rel in visible} <= committed

    resumed = subprocess.run(_command(data, out) + SETTINGS, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Only the remaining shards were counted and encoded (the plan's line, not a rate such as "4.18 samples/s").
    left = 6 - len(committed)
    assert f"{left} shards to encode ({len(committed)} already committed), {3 * left} samples," in resumed.stderr

    fresh = subprocess.run(_command(data, clean) + SETTINGS, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]

    a, b = _files(out), _files(clean)
    assert sorted(a) == sorted(b) and len(a) == 12
    for rel in a:
        if rel.endswith(".tar"):
            assert a[rel].read_bytes() == b[rel].read_bytes(), rel
        else:
            assert pq.read_table(a[rel]).equals(pq.read_table(b[rel])), rel
    assert not [p for p in out.rglob("*.tmp")]
