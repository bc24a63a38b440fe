"""s3:// inputs against a real S3-compatible server (moto's, on 127.0.0.1): listing, reading, a whole job."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jobs.dataset.reader import read_metadata
from jobs.demo_data import write_demo_dataset
from jobs.inputs.shards import list_shards
from jobs.inputs.tar_samples import ShardReadError, read_shard
from jobs.orchestration.config import JobConfig, UsageError


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto server with bucket `inputs` holding three demo shards under `data/` (and one deeper)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from jobs.inputs import shards

    shards._s3.cache_clear()
    local = write_demo_dataset(tmp_path_factory.mktemp("s3data"), shards=3, samples_per_shard=2, seed=7)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="inputs")
    for path in local:
        client.upload_file(str(path), "inputs", f"data/{path.name}")
    client.upload_file(str(local[0]), "inputs", "data/more/extra.tar")
    yield env, local
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shards._s3.cache_clear()


def test_s3_specs_list_like_local_ones(s3):
    names = lambda specs: [(s.source, s.name) for s in list_shards(specs)]  # noqa: E731
    assert names(["s3://inputs/data/shard-{000000..000001}.tar"]) == [
        ("s3://inputs/data/shard-000000.tar", "shard-000000"),
        ("s3://inputs/data/shard-000001.tar", "shard-000001"),
    ]
    assert [n for _, n in names(["s3://inputs/data"])] == ["more/extra", "shard-000000", "shard-000001", "shard-000002"]
    assert [n for _, n in names(["s3://inputs/data/shard-*.tar"])] == ["shard-000000", "shard-000001", "shard-000002"]
    # A glob reads as a local one: `*` stays in one path part, `**` crosses them.
    assert [n for _, n in names(["s3://inputs/data/*.tar"])] == ["shard-000000", "shard-000001", "shard-000002"]
    assert [n for _, n in names(["s3://inputs/data/**.tar"])][0] == "more/extra"
    assert [n for _, n in names(["s3://inputs/data/shard-00000[01].tar"])] == ["shard-000000", "shard-000001"]
    with pytest.raises(ValueError, match="input shard not found: s3://inputs/data/nope.tar"):
        list_shards(["s3://inputs/data/nope.tar"])
    with pytest.raises(ValueError, match="matches no object"):
        list_shards(["s3://inputs/none-*.tar"])


def test_an_s3_shard_reads_as_the_local_one(s3):
    _, local = s3
    damage: list[str] = []
    remote = [(r.key, r.files) for r in read_shard("s3://inputs/data/shard-000001.tar", damage.append)]
    assert remote == [(r.key, r.files) for r in read_shard(str(local[1]), damage.append)] and not damage
    with pytest.raises(ShardReadError):
        list(read_shard("s3://inputs/data/gone.tar", damage.append))


def test_an_object_store_output_is_refused_before_anything_starts():
    config = JobConfig(input=["x.tar"], output="s3://bucket/out")
    with pytest.raises(UsageError, match="cannot write to 's3://bucket/out': the output is a local or mounted"):
        config.validate()


@pytest.mark.slow
def test_a_job_reads_its_shards_from_s3(s3, tmp_path):
    env, local = s3
    settings = ["--set", "video.num_frames=8", "--set", "video.height=64", "--set", "video.width=64"]
    cmd = [sys.executable, "-m", "jobs.precompute", "--input", "s3://inputs/data/shard-*.tar", "--output"]
    result = subprocess.run([*cmd, str(tmp_path / "out"), *settings], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metadata(tmp_path / "out").to_pylist()
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert {r["source"] for r in rows} == {f"s3://inputs/data/{p.name}" for p in local}
