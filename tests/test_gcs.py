"""gs:// inputs against a real GCS emulator on 127.0.0.1 (`gcp-storage-emulator`, the JSON API that
pyarrow's GCS filesystem speaks): listing, reading, and a whole job from gs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from jobs.dataset.reader import read_metadata
from jobs.demo_data import write_demo_dataset
from jobs.inputs.shards import list_shards
from jobs.inputs.tar_samples import ShardReadError, read_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """An emulator with bucket `clips` holding two demo shards under `data/`; STORAGE_EMULATOR_HOST set."""
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="clips")
    server.start()
    base = f"http://127.0.0.1:{port}"
    local = write_demo_dataset(tmp_path_factory.mktemp("gcsdata"), shards=2, samples_per_shard=2, seed=8)
    for path in local:
        upload = f"{base}/upload/storage/v1/b/clips/o?uploadType=media&name=data/{path.name}"
        request = urllib.request.Request(upload, data=Path(path).read_bytes(), method="POST")
        assert urllib.request.urlopen(request).status == 200
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = base
    yield local
    server.stop()
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved


def test_gs_specs_list_and_read_like_local_ones(gcs):
    shards = list_shards(["gs://clips/data/shard-*.tar"])
    assert [(s.source, s.name) for s in shards] == [
        ("gs://clips/data/shard-000000.tar", "shard-000000"),
        ("gs://clips/data/shard-000001.tar", "shard-000001"),
    ]
    assert [s.name for s in list_shards(["gs://clips/data"])] == ["shard-000000", "shard-000001"]
    damage: list[str] = []
    remote = [(r.key, r.files) for r in read_shard("gs://clips/data/shard-000001.tar", damage.append)]
    assert remote == [(r.key, r.files) for r in read_shard(str(gcs[1]), damage.append)] and not damage
    with pytest.raises(ValueError, match="input shard not found: gs://clips/data/nope.tar"):
        list_shards(["gs://clips/data/nope.tar"])
    with pytest.raises(ShardReadError):
        list(read_shard("gs://clips/data/gone.tar", damage.append))


@pytest.mark.slow
def test_a_job_reads_its_shards_from_gs(gcs, tmp_path):
    settings = ["--set", "video.num_frames=8", "--set", "video.height=64", "--set", "video.width=64"]
    cmd = [sys.executable, "-m", "jobs.precompute", "--input", "gs://clips/data/shard-*.tar", "--output"]
    result = subprocess.run([*cmd, str(tmp_path / "out"), *settings], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metadata(tmp_path / "out").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {r["source"] for r in rows} == {f"gs://clips/data/{p.name}" for p in gcs}
