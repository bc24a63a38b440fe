"""s3:// against a real S3-compatible server (moto's, on 127.0.0.1): inputs listed and read; the
output store's commit protocol (conditional marker, whole objects, aborted uploads, leases); and
whole jobs with s3 output: read back by every reader, killed and resumed, on two nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from botocore.config import Config
from conftest import cluster_head, kill_session
from test_dataset import _write

from jobs.dataset import store as store_module
from jobs.dataset.catalog import marker_names, read_commit, remove_uncommitted
from jobs.dataset.faults import FAULT_ENV
from jobs.dataset.reader import read_metadata
from jobs.dataset.store import LockLost, S3Store, open_store, staging_folder
from jobs.dataset.training import LatentDataset, latent_stream
from jobs.demo_data import write_demo_dataset
from jobs.inputs import shards as shards_module
from jobs.inputs.shards import list_shards
from jobs.inputs.tar_samples import ShardReadError, read_shard
from jobs.objectstore import QUICK_S, region
from jobs.orchestration.config import JobConfig, UsageError
from jobs.validate import validate

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    env: dict[str, str]
    local: list[Path]  # the demo shards uploaded to s3://inputs/data/
    client: Any  # boto3, for looking behind the store's back


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto server with bucket `inputs` holding three demo shards under `data/` (and one deeper),
    and an empty bucket `outputs`."""
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

    pass  # the filesystems are cached per endpoint (jobs.objectstore)
    local = write_demo_dataset(tmp_path_factory.mktemp("s3data"), shards=3, samples_per_shard=2, seed=7)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="inputs")
    for path in local:
        client.upload_file(str(path), "inputs", f"data/{path.name}")
    client.upload_file(str(local[0]), "inputs", "data/more/extra.tar")
    client.create_bucket(Bucket="outputs")
    yield Server(env, local, client)
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("list_over", [16, 0])  # each named object asked for, or their folder listed once
def test_s3_specs_list_like_local_ones(s3, list_over, monkeypatch):
    monkeypatch.setattr(shards_module, "LIST_OVER", list_over)
    names = lambda specs: [(s.source, s.name) for s in list_shards(specs)]  # noqa: E731
    assert names(["s3://inputs/data/shard-{000000..000001}.tar"]) == [
        ("s3://inputs/data/shard-000000.tar", "shard-000000"),
        ("s3://inputs/data/shard-000001.tar", "shard-000001"),
    ]
    assert [n for _, n in names(["s3://inputs/data/{more/extra,shard-000002}.tar"])] == ["more/extra", "shard-000002"]
    with pytest.raises(ValueError, match="input shard not found: s3://inputs/data/shard-000003.tar"):
        list_shards(["s3://inputs/data/shard-{000000..000003}.tar"])
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
    local = s3.local
    damage: list[str] = []
    remote = [(r.key, r.files) for r in read_shard("s3://inputs/data/shard-000001.tar", damage.append)]
    assert remote == [(r.key, r.files) for r in read_shard(str(local[1]), damage.append)] and not damage
    with pytest.raises(ShardReadError):
        list(read_shard("s3://inputs/data/gone.tar", damage.append))


def test_outputs_that_cannot_be_written_are_refused_before_anything_starts(tmp_path):
    for url in ("gs://bucket/out", "https://host/out", "file:///tmp/out", "s3:/bucket/out", "S3:bucket"):
        with pytest.raises(UsageError, match=f"cannot write to '{url}': the output is a local or mounted"):
            JobConfig(input=["x.tar"], output=url).validate()
    JobConfig(input=["x.tar"], output="s3://bucket/out").validate()
    JobConfig(input=["x.tar"], output="./a:b").validate()  # a local folder with a colon in its name
    # From the command line: exit 2 with the reason, before any cluster starts or any folder appears.
    (tmp_path / "x.tar").write_bytes(b"")
    run = subprocess.run(
        [sys.executable, "-m", "jobs.precompute", "--input", "x.tar", "--output", "s3:/bucket/out"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "cannot write to 's3:/bucket/out'" in run.stderr, run.stderr
    assert "Ray" not in run.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["x.tar"]


def test_the_marker_is_created_once_and_data_objects_appear_whole(s3):
    store = S3Store("s3://outputs/unit", part_bytes=5 * 2**20, single_put_max=5 * 2**20)
    assert store.create("_commits/m.json", b"first") and not store.create("_commits/m.json", b"second")
    assert store.read_bytes("_commits/m.json") == b"first"
    assert store.conditional  # the server took the conditional header: no check-then-put fallback
    data = os.urandom(12 * 2**20)  # three parts of a multipart upload
    for rel, blob in (("latents/big.tar", data), ("meta/small.parquet", data[:1000])):
        staged = store.staging(rel)
        staged.write_bytes(blob)
        store.publish(staged, rel)
        assert not staged.exists() and store.read_bytes(rel) == blob
    assert store.read_range("latents/big.tar", 7 * 2**20, 5) == data[7 * 2**20 : 7 * 2**20 + 5]
    assert store.list() == ["_commits/m.json", "latents/big.tar", "meta/small.parquet"]
    assert store.list("latents") == ["latents/big.tar"] and store.size("nope") is None
    assert not s3.client.list_multipart_uploads(Bucket="outputs", Prefix="unit/").get("Uploads")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope")


def test_a_data_object_is_created_only_where_its_name_is_free_and_removed_only_as_put(s3):
    """A publish to a taken name is refused (one PUT or a multipart upload alike), the object and
    the staged file left as they were; a delete given the version a publish returned removes the
    object only while it is that version."""
    store = S3Store("s3://outputs/versions", part_bytes=5 * 2**20, single_put_max=5 * 2**20)
    for rel, size in (("meta/small.parquet", 1000), ("latents/big.tar", 11 * 2**20)):
        staged = store.staging(rel)
        staged.write_bytes(first := os.urandom(size))
        version = store.publish(staged, rel)
        staged = store.staging(rel)
        staged.write_bytes(os.urandom(size))
        with pytest.raises(FileExistsError):
            store.publish(staged, rel)
        assert staged.exists() and store.read_bytes(rel) == first
        staged.unlink()
        s3.client.put_object(Bucket="outputs", Key=f"versions/{rel}", Body=b"another attempt's")
        assert not store.delete(rel, version) and store.read_bytes(rel) == b"another attempt's"
        assert store.delete(rel, s3.client.head_object(Bucket="outputs", Key=f"versions/{rel}")["ETag"])
        assert store.size(rel) is None
    assert not s3.client.list_multipart_uploads(Bucket="outputs", Prefix="versions/").get("Uploads")


def test_an_upload_killed_midway_shows_nothing_and_its_leftover_is_aborted(s3):
    """The process dies after the first part of a multipart upload: no object appears, and the
    next job's cleanup aborts the unfinished upload (no parts are left to pay for)."""
    script = (
        "import os; from jobs.dataset.store import S3Store\n"
        "store = S3Store('s3://outputs/killed', part_bytes=5 * 2**20, single_put_max=5 * 2**20)\n"
        "staged = store.staging('latents/x.tar'); staged.write_bytes(os.urandom(11 * 2**20))\n"
        "store.publish(staged, 'latents/x.tar')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, FAULT_ENV: "mid-upload"})
    assert result.returncode == -signal.SIGKILL
    store = S3Store("s3://outputs/killed")
    assert store.size("latents/x.tar") is None and store.list() == []
    assert len(s3.client.list_multipart_uploads(Bucket="outputs", Prefix="killed/")["Uploads"]) == 1
    assert store.cleanup() == 1
    assert not s3.client.list_multipart_uploads(Bucket="outputs", Prefix="killed/").get("Uploads")
    # Its staged file (11 MiB in this machine's staging folder) goes when another process stages one.
    assert [p.stat().st_size for p in staging_folder().glob("*.tmp")] == [11 * 2**20]
    store.staging("latents/y.tar").unlink()
    assert not list(staging_folder().glob("*.tmp"))


def test_a_multipart_upload_that_fails_is_aborted_at_once(s3):
    """The server refuses to complete the upload (parts under S3's 5 MiB minimum): the object does
    not appear, and the upload is aborted by the attempt itself, not left for a cleanup."""
    store = S3Store("s3://outputs/refused", part_bytes=2**20, single_put_max=2**20)
    staged = store.staging("latents/x.tar")
    staged.write_bytes(os.urandom(3 * 2**20))
    with pytest.raises(Exception, match="EntityTooSmall"):
        store.publish(staged, "latents/x.tar")
    assert store.size("latents/x.tar") is None and not staged.exists()
    assert not s3.client.list_multipart_uploads(Bucket="outputs", Prefix="refused/").get("Uploads")


def _relay(s3, monkeypatch, intercept):  # -> ThreadingHTTPServer
    """An HTTP server on 127.0.0.1, made the endpoint, that passes each request on to the moto
    server unless `intercept(handler)` answers it (and returns True)."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    upstream = urlsplit(s3.env["AWS_ENDPOINT_URL"])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _relay(self) -> None:
            body = self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if intercept(self):
                return
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding")}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                    self.send_header(k, v)
            # A HEAD's length is the object's, not that of its (empty) body.
            self.send_header("Content-Length", response.getheader("Content-Length") or str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            connection.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    return server


def _not_implemented(handler, what: str) -> bool:
    """Answers a relayed request as a server that lacks `what` does: 501 NotImplemented."""
    error = f"<Error><Code>NotImplemented</Code><Message>{what}</Message></Error>".encode()
    handler.send_response(501)
    handler.send_header("Content-Type", "application/xml")
    handler.send_header("Content-Length", str(len(error)))
    handler.end_headers()
    handler.wfile.write(error)
    return True


@pytest.fixture
def unconditional(s3, monkeypatch):
    """An S3 server without conditional writes (as older MinIO and Ceph releases are): answers 501
    NotImplemented to a request with If-None-Match or If-Match, and passes every other on."""

    def refuse_conditions(handler) -> bool:
        if "If-None-Match" not in handler.headers and "If-Match" not in handler.headers:
            return False
        return _not_implemented(handler, "conditional writes")

    server = _relay(s3, monkeypatch, refuse_conditions)
    yield server
    server.shutdown()


@pytest.fixture
def flaky(s3, monkeypatch):
    """The S3 server behind a relay whose `down` event, while set, drops every connection unanswered
    (a network down, a partition)."""
    import threading

    down = threading.Event()

    def drop(handler) -> bool:
        if down.is_set():
            handler.close_connection = True
        return down.is_set()

    server = _relay(s3, monkeypatch, drop)
    server.down = down
    # The client gives up on a request at once (the job's retries for minutes): a lease's renewals
    # then fail beat after beat instead of waiting in the client's back-off
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        region_name=region(),
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    monkeypatch.setattr(store_module, "s3_client", lambda quick=False: client)
    yield server
    down.clear()
    server.shutdown()


def test_what_must_not_land_late_is_given_up_within_quick_s(s3, monkeypatch):
    """A conditional delete and a marker's PUT that the store holds unanswered (a partition) are
    given up by the client within `QUICK_S`: sent while a lease is its holder's, they land while it
    still is, or not at all (the default client retries for minutes)."""
    import threading

    store = S3Store("s3://outputs/quick")
    staged = store.staging("latents/x.tar")
    staged.write_bytes(b"x" * 1000)
    version = store.publish(staged, "latents/x.tar")
    hold, tries = threading.Event(), []

    def held(handler) -> bool:  # unanswered while `hold` is set, then the connection drops
        if hold.is_set() and handler.command in ("DELETE", "PUT"):
            tries.append(handler.command)
            time.sleep(QUICK_S + 5)
            handler.close_connection = True
            return True
        return False

    server = _relay(s3, monkeypatch, held)
    try:
        hold.set()
        for request in (lambda: store.delete("latents/x.tar", version), lambda: store.create("_commits/x.json", b"{}")):
            started = time.monotonic()
            with pytest.raises(Exception, match="timeout|timed out"):
                request()
            assert time.monotonic() - started <= QUICK_S
        assert tries == ["DELETE", "DELETE", "PUT", "PUT"]  # two tries each (the bound counts two)
    finally:
        hold.clear()
        server.shutdown()


def _markers_unanswered(s3, monkeypatch, prefix: str, held: int, land_first: bool = False):  # -> (server, tries)
    """A relay that leaves the first `held` PUTs of shard part-0's marker under `prefix` unanswered
    (given up by the client within `QUICK_S`); with `land_first`, the first of them reaches the
    store all the same (its answer is what is lost)."""
    tries: list[str] = []

    def hold(handler) -> bool:
        if handler.command != "PUT" or "/_commits/part-0.json" not in handler.path or len(tries) == held:
            return False
        if land_first and not tries:
            s3.client.put_object(Bucket="outputs", Key=f"{prefix}/_commits/part-0.json", Body=handler.body)
        tries.append(handler.path)
        time.sleep(QUICK_S + 5)
        handler.close_connection = True
        return True

    return _relay(s3, monkeypatch, hold), tries


def test_a_marker_left_unanswered_once_is_tried_again_and_the_shard_commits(s3, monkeypatch):
    """The store holds the marker's PUT unanswered, and the client's second try too: the marker is
    tried again, after a lease check, and the shard commits without being encoded again."""
    server, tries = _markers_unanswered(s3, monkeypatch, "slow-marker", held=2)
    try:
        store = S3Store("s3://outputs/slow-marker")
        writer, _ = _write(store)
        marker = writer.commit()
        assert len(tries) == 2 and read_commit(store, "part-0", verify=True) == marker
    finally:
        server.shutdown()


def test_files_stay_where_a_marker_may_have_landed_unanswered(s3, monkeypatch):
    """The marker's first PUT reaches the store, but its answer never comes, nor any answer to the
    tries after it: the commit fails, and its files stay, for the marker that did land names them."""
    server, tries = _markers_unanswered(s3, monkeypatch, "slow-answers", held=6, land_first=True)
    try:
        store = S3Store("s3://outputs/slow-answers")
        writer, _ = _write(store)
        with pytest.raises(Exception, match="timeout|timed out"):
            writer.commit()
        writer.abort()
        assert len(tries) == 6 and read_commit(store, "part-0", verify=True) is not None
    finally:
        server.shutdown()


def test_a_store_that_refuses_the_condition_on_a_completion_only_keeps_it_elsewhere(s3, monkeypatch):
    """A server that takes `If-None-Match` on a PUT but not on a multipart completion: uploads fall
    back to a check before the completion, and the marker and the leases keep their condition."""

    def refuse_on_completion(handler) -> bool:
        if handler.command != "POST" or "uploadId=" not in handler.path or "If-None-Match" not in handler.headers:
            return False
        return _not_implemented(handler, "conditional completions")

    server = _relay(s3, monkeypatch, refuse_on_completion)
    try:
        store = S3Store("s3://outputs/no-conditional-completion", part_bytes=5 * 2**20, single_put_max=5 * 2**20)
        for expected in (None, FileExistsError):
            staged = store.staging("latents/big.tar")
            staged.write_bytes(b"y" * (6 * 2**20))
            if expected is None:
                store.publish(staged, "latents/big.tar")
            else:
                with pytest.raises(expected):
                    store.publish(staged, "latents/big.tar")
                staged.unlink()
        assert not store.conditional_uploads and store.conditional
    finally:
        server.shutdown()


def test_a_lease_that_cannot_be_renewed_counts_as_lost_before_it_runs_out(flaky, monkeypatch):
    """Its holder cut off from the store (every renewal stuck in the client's retries), a lease is
    reported lost once it has gone unrenewed for three quarters of its length: another process may
    take it over at its length, and the holder must not write on. It is renewed again once the
    network is back (the directory's lock is not left to lapse under a running job)."""
    monkeypatch.setattr(store_module, "LEASE_S", 4.0)  # renewed every second
    store = S3Store("s3://outputs/flaky")
    with pytest.raises(ValueError, match="the holder's own error"):
        with store.lock("held.lock") as lost:
            time.sleep(1.5)  # renewed once
            assert not lost.is_set()
            flaky.down.set()
            cut = time.monotonic()
            while not lost.is_set() and time.monotonic() - cut < 3.5:
                time.sleep(0.05)
            assert lost.is_set() and time.monotonic() - cut <= 3.5  # by 3 s after the last renewal
            flaky.down.clear()  # and once the network is back, the lease is renewed again: still held
            time.sleep(6.0)  # (a lease renewed last at the cut, or just after, would have run out)
            assert store.lock_held("held.lock") and lost.is_set()
            raise ValueError("the holder's own error")


def test_a_lease_release_that_fails_does_not_replace_the_holders_error(flaky):
    """The store unreachable when the holder lets go: the lease is left to run out, and what the
    holder raised is what the caller sees."""
    store = S3Store("s3://outputs/flaky-release")
    with pytest.raises(ValueError, match="the holder's own error"):
        with store.lock("held.lock"):
            flaky.down.set()
            raise ValueError("the holder's own error")


def test_a_store_without_conditional_writes_falls_back_to_checks(unconditional, monkeypatch):
    """The marker and the leases work on such a store, by checking first (the README says so)."""
    monkeypatch.setattr(store_module, "LEASE_S", 4.0)
    store = S3Store("s3://outputs/unconditional")
    assert store.create("_commits/m.json", b"first") and not store.create("_commits/m.json", b"second")
    assert not store.conditional and store.read_bytes("_commits/m.json") == b"first"
    store = S3Store("s3://outputs/unconditional")  # a lease is the first to find out, this time
    with store.lock("a", wait=False) as lost:
        assert store.lock_held("a")
        with pytest.raises(BlockingIOError), store.lock("a", wait=False):
            pass
        time.sleep(2.5)  # renewed (by a plain write after a check) and still ours
        assert not lost.is_set()
    assert not store.lock_held("a") and store.size("a") is None  # released
    writer, _ = _write(store)
    marker = writer.commit()
    assert read_commit(store, "part-0", verify=True) == marker
    tar = marker["latents"]["path"]  # a delete of a version: after a check, here too
    assert not store.delete(tar, '"another version"') and store.delete(tar, store.version(tar))


def test_a_lease_is_exclusive_renewed_and_taken_over_only_when_abandoned(s3, monkeypatch):
    monkeypatch.setattr(store_module, "LEASE_S", 4.0)  # renewed every second; times on the server are whole seconds
    store = S3Store("s3://outputs/leases")
    with store.lock("a", wait=False):
        assert store.lock_held("a")
        with pytest.raises(BlockingIOError), store.lock("a", wait=False):
            pass
        time.sleep(5)  # longer than a lease: the holder's renewals keep it
        with pytest.raises(BlockingIOError), store.lock("a", wait=False):
            pass
    assert not store.lock_held("a") and store.size("a") is None

    # A holder killed on this machine: its lease is taken over at once.
    script = (
        "import os, signal; from jobs.dataset.store import S3Store\n"
        "S3Store('s3://outputs/leases').lock('b').__enter__(); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    assert store.size("b") is not None and not store.lock_held("b")
    with store.lock("b", wait=False):
        assert store.lock_held("b")

    # A holder on another machine: held until it has not renewed for a lease's length.
    s3.client.put_object(Bucket="outputs", Key="leases/c", Body=json.dumps({"host": "elsewhere", "pid": 1}).encode())
    assert store.lock_held("c")
    with pytest.raises(BlockingIOError), store.lock("c", wait=False):
        pass
    time.sleep(5)
    assert not store.lock_held("c")
    with store.lock("c", wait=False):
        pass


def test_of_two_takers_of_an_abandoned_lease_only_one_gets_it(s3, monkeypatch):
    """B judges a dead holder's lease abandoned; A takes it over before B acts. B's delete is
    conditional on the lease it judged, so it fails, and A keeps the lease it now holds."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {**store_module._process_identity(), "pid": int(dead.stdout), "lease": "dead"}
    s3.client.put_object(Bucket="outputs", Key="leases/race", Body=json.dumps(owner).encode())
    judge = store_module._lease_state
    first, taken = store_module._Lease(S3Store("s3://outputs"), "leases/race", wait=False), []

    def late_judgement(bucket: str, key: str) -> dict[str, Any] | None:
        state = judge(bucket, key)
        if not taken:  # B has judged the dead holder's lease; A takes it over meanwhile
            taken.append(first)
            first.__enter__()
        return state

    monkeypatch.setattr(store_module, "_lease_state", late_judgement)
    second = store_module._Lease(S3Store("s3://outputs"), "leases/race", wait=False)
    try:
        with pytest.raises(BlockingIOError):
            second.__enter__()
        body = json.loads(s3.client.get_object(Bucket="outputs", Key="leases/race")["Body"].read())
        assert body["lease"] == first.owner["lease"]
    finally:
        first.__exit__(None, None, None)
    assert S3Store("s3://outputs/leases").size("race") is None  # released


def test_a_late_attempt_on_s3_returns_the_committed_marker_and_rewrites_nothing(s3):
    store = S3Store("s3://outputs/zombie")
    first, _ = _write(store)
    marker = first.commit()
    late, _ = _write(store, keys=("other", "keys"))  # different bytes, to see any overwrite
    assert late.commit() == marker
    for part in ("latents", "meta"):
        assert store.sha256(marker[part]["path"]) == marker[part]["sha256"]
    assert read_commit(store, "part-0", verify=True) == marker
    assert store.list() == ["_commits/part-0.json", "latents/part-0.tar", "meta/part-0.parquet"]  # lease released
    assert not list(staging_folder().glob(f"{os.getpid()}.*"))  # staged files consumed


def test_an_attempt_whose_lease_is_taken_over_stops_writing_and_leaves_the_names_alone(s3, monkeypatch):
    """The committing attempt stalls past its lease's length; another process takes the lease over.
    The stalled attempt must notice before it writes more (a marker above all), and must not delete
    what is under the shard's names (they may be the new holder's by now)."""
    monkeypatch.setattr(store_module, "LEASE_S", 4.0)  # renewed every second
    store = S3Store("s3://outputs/stalled")
    writer, _ = _write(store)
    publish = store.publish

    def stall_then_publish(staged: Path, rel: str) -> None:
        if rel.endswith(".tar"):
            lease = "stalled/_commits/.part-0.lock"
            s3.client.delete_object(Bucket="outputs", Key=lease)  # taken over, as an abandoned lease is
            s3.client.put_object(Bucket="outputs", Key=lease, Body=b'{"host": "elsewhere", "pid": 1}')
            time.sleep(2.5)  # the stalled holder's next renewal fails
        publish(staged, rel)

    monkeypatch.setattr(store, "publish", stall_then_publish)
    with pytest.raises(LockLost, match="commit lock was taken over"):
        writer.commit()
    writer.abort()  # as the worker does after a failed commit
    assert store.size("_commits/part-0.json") is None and store.size("meta/part-0.parquet") is None
    assert store.size("latents/part-0.tar") is not None  # not deleted by the attempt that lost the lock
    s3.client.delete_object(Bucket="outputs", Key="stalled/_commits/.part-0.lock")
    assert remove_uncommitted(store) == ["part-0"]  # the job's tidy-up, once the lock is free
    assert store.list() == []


def _taken_over_during(
    s3, store: S3Store, monkeypatch, stalled_rel: str, then: Callable[[], None], error: Exception | None = None
) -> None:
    """Makes the publish of `stalled_rel` stall past the lease's length: the shard's lease is taken
    over and `then()` runs (another attempt's commit), the stalled holder's renewal fails; then the
    stalled request goes on, or fails with `error`."""
    publish = store.publish

    def stall_then_publish(staged: Path, rel: str) -> str:
        if rel == stalled_rel:
            s3.client.delete_object(Bucket="outputs", Key=f"{store.prefix}/_commits/.part-0.lock")
            then()
            time.sleep(2.5)  # the stalled holder's next renewal fails
            if error is not None:
                raise error
        return publish(staged, rel)

    monkeypatch.setattr(store, "publish", stall_then_publish)


def test_a_stalled_attempts_late_upload_does_not_replace_the_next_attempts_commit(s3, monkeypatch):
    """The tar's upload of an attempt that passed its lease check stalls (a partition, the client's
    retries) past the lease's length; another attempt takes the lease over and commits different
    bytes. The late upload lands after that commit: it must not replace the committed tar."""
    monkeypatch.setattr(store_module, "LEASE_S", 4.0)  # renewed every second
    url = "s3://outputs/late-upload"
    stalled, _ = _write(store := S3Store(url))
    committed: list[dict[str, Any]] = []
    then = lambda: committed.append(_write(url, keys=("other", "keys"))[0].commit())  # noqa: E731
    _taken_over_during(s3, store, monkeypatch, "latents/part-0.tar", then)
    with pytest.raises(LockLost):
        stalled.commit()
    stalled.abort()  # as the worker does after a failed commit
    assert read_commit(store, "part-0", verify=True) == committed[0]  # the files its marker names, intact


def test_a_stalled_attempt_that_fails_removes_nothing_once_its_lease_is_lost(s3, monkeypatch):
    """The stalled attempt's tar is up; its Parquet upload stalls while another attempt takes the
    lease over and commits the same bytes (its tar replaces the stalled one's, which no marker
    names), then fails. The stalled attempt must not remove its tar: the same bytes are the same
    version (ETag), and the name is the committed attempt's now."""
    monkeypatch.setattr(store_module, "LEASE_S", 4.0)
    url = "s3://outputs/late-failure"
    stalled, _ = _write(store := S3Store(url))
    committed: list[dict[str, Any]] = []
    then = lambda: committed.append(_write(url)[0].commit())  # noqa: E731
    _taken_over_during(s3, store, monkeypatch, "meta/part-0.parquet", then, ConnectionError("network down"))
    with pytest.raises(ConnectionError):
        stalled.commit()
    stalled.abort()
    assert read_commit(store, "part-0", verify=True) == committed[0]


SETTINGS = ["--set", "video.num_frames=8", "--set", "video.height=64", "--set", "video.width=64"]
SPEC = "s3://inputs/data/shard-*.tar"


def precompute(output: str, *extra: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "jobs.precompute", "--input", SPEC, "--output", output, *SETTINGS, *extra]


def clips(root: str | Path) -> list[tuple[str, str, int, str]]:
    return sorted((r["source"], r["key"], r["clip"], r["status"]) for r in read_metadata(root).to_pylist())


def data_objects(root: str | Path) -> dict[str, bytes]:
    """Every latent tar and Parquet file of an output, local or s3, by name."""
    store = open_store(root)
    return {rel: store.read_bytes(rel) for rel in store.list() if rel.endswith((".tar", ".parquet"))}


@pytest.fixture(scope="module")
def local_run(s3, tmp_path_factory) -> Path:
    """The s3 inputs encoded into a local directory: what every s3 output must equal byte for byte."""
    out = tmp_path_factory.mktemp("local") / "out"
    result = subprocess.run(precompute(str(out)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metadata(out).to_pylist()
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert {r["source"] for r in rows} == {f"s3://inputs/data/{p.name}" for p in s3.local}
    return out


@pytest.mark.slow
def test_a_job_with_s3_input_and_output_reads_back_everywhere(s3, local_run, tmp_path):
    out = "s3://outputs/run"
    result = subprocess.run(precompute(out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert data_objects(out) == data_objects(local_run)  # the same bytes as a local output
    assert not s3.client.list_multipart_uploads(Bucket="outputs", Prefix="run/").get("Uploads")
    listed = {o["Key"] for o in s3.client.list_objects_v2(Bucket="outputs", Prefix="run/")["Contents"]}
    assert {"run/job.json", "run/manifest.json", "run/report.json"} <= listed and "run/.lock" not in listed

    # pyarrow over s3 directly, as any Parquet reader would (no project code).
    fs = pafs.S3FileSystem(endpoint_override=s3.env["AWS_ENDPOINT_URL"], region="us-east-1")
    direct = pq.read_table("outputs/run/meta/shard-000001.parquet", filesystem=fs)
    assert direct.to_pylist() == pq.read_table(local_run / "meta/shard-000001.parquet").to_pylist()

    # The project's readers and tools, on the s3 URL.
    assert read_metadata(out).to_pylist() == read_metadata(local_run).to_pylist()
    dataset, local = LatentDataset(out), LatentDataset(local_run)
    assert len(dataset) == 6 and all(torch.equal(dataset[i]["latent"], local[i]["latent"]) for i in range(6))
    assert len(list(latent_stream(out))) == 6
    checked = subprocess.run([sys.executable, "-m", "jobs.validate", out], capture_output=True, text=True)
    assert checked.returncode == 0 and "valid; 3 committed shards, 6 rows" in checked.stdout, checked.stdout
    state = subprocess.run([sys.executable, "-m", "jobs.status", out, "--json"], capture_output=True, text=True)
    assert state.returncode == 0 and json.loads(state.stdout)["finished"] is True, state.stdout
    decoded = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.reconstruct",
            "--latents",
            out,
            "--limit",
            "1",
            "--output",
            str(tmp_path / "recon"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert decoded.returncode == 0, decoded.stderr[-2000:]
    assert json.loads((tmp_path / "recon" / "report.json").read_text())["latents"] == out

    # A corrupted object is found by validate, and the next run encodes that shard again.
    s3.client.put_object(Bucket="outputs", Key="run/latents/shard-000002.tar", Body=b"x" * 10)
    assert (
        "PROBLEM latents/shard-000002.tar"
        in subprocess.run([sys.executable, "-m", "jobs.validate", out], capture_output=True, text=True).stdout
    )
    again = subprocess.run(precompute(out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "1 shards to encode (2 already committed)" in again.stderr, again.stderr[-2000:]
    assert data_objects(out) == data_objects(local_run)


def _committing(command: list[str], store: Any, fault: str) -> subprocess.Popen:
    """A job run in a session of its own with `fault` (`FAULT_ENV`), once it has committed a shard
    (and still runs); killed if it does not get there."""
    job = subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, FAULT_ENV: fault},
    )
    deadline = time.monotonic() + 240
    while not marker_names(store) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.1)
    if not marker_names(store) or job.poll() is not None:
        kill_session(job.pid)
        raise AssertionError(f"the run ended, or committed nothing, in time: {job.communicate()[1][-3000:]}")
    return job


@pytest.mark.slow
def test_a_killed_s3_run_resumes_where_it_stopped(s3, local_run):
    """The whole job (driver, Ray, actors) is SIGKILLed after its first commit; the rerun takes over
    the dead job's lease at once, encodes only what is left, and ends with the local run's bytes."""
    out = "s3://outputs/killed-run"
    store = open_store(out)
    job = _committing(precompute(out, "--workers", "1"), store, "slow-commit")
    kill_session(job.pid)
    job.wait()
    assert store.exists(".lock") and not store.exists("manifest.json")
    # What a kill mid-upload leaves (the job's own objects are too small for multipart uploads):
    # the rerun aborts it.
    s3.client.create_multipart_upload(Bucket="outputs", Key="killed-run/latents/shard-000002.tar")
    again = subprocess.run(precompute(out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = int(re.search(r"\((\d+) already committed\)", again.stderr).group(1))
    assert skipped >= 1
    assert data_objects(out) == data_objects(local_run)
    assert not s3.client.list_multipart_uploads(Bucket="outputs", Prefix="killed-run/").get("Uploads")


@pytest.mark.slow
def test_a_job_whose_directory_lease_is_taken_over_stops_and_leaves_the_directory_alone(s3):
    """The driver's lease on the output is taken over by another job (as once its renewals have
    failed for a lease's length): the driver stops at once, with a line that says why, and touches
    nothing more: the new holder's lease, its unfinished uploads and the report are left alone."""
    out, store = "s3://outputs/taken-over", open_store("s3://outputs/taken-over")
    script = (  # the job, with 4 s leases (renewed every second) and a 2 s pause before each commit
        "import sys; from jobs.dataset import store; store.LEASE_S = 4.0\n"
        "from jobs.precompute import main; sys.exit(main(sys.argv[1:]))\n"
    )
    job = _committing([sys.executable, "-c", script, *precompute(out)[3:], "--workers", "1"], store, "slow-commit=2")
    try:
        s3.client.put_object(Bucket="outputs", Key="taken-over/.lock", Body=b'{"host": "elsewhere", "pid": 1}')
        # The new holder's upload under way, which the stopped job's tidy-up must not abort
        s3.client.create_multipart_upload(Bucket="outputs", Key="taken-over/latents/shard-000002.tar")
        _, stderr = job.communicate(timeout=120)
    finally:
        kill_session(job.pid)
    said = "another job took over, or may take over, the lock of s3://outputs/taken-over"
    assert job.returncode == 1 and said in stderr, stderr[-3000:]
    assert json.loads(store.read_bytes(".lock")) == {"host": "elsewhere", "pid": 1}
    assert s3.client.list_multipart_uploads(Bucket="outputs", Prefix="taken-over/")["Uploads"]
    assert not store.exists("report.json") and not store.exists("manifest.json")


@pytest.mark.slow
def test_a_two_node_cluster_sharing_no_directory_writes_one_s3_output(s3, local_run, monkeypatch):
    """Two nodes of one GPU each (so one actor on each): everything the job writes goes to s3."""
    from ray.cluster_utils import Cluster

    # Three seconds per commit (the nodes' environment, which their actors inherit): the run starts
    # with the first actor ready, and this keeps it going until the other is ready too and takes
    # shards (a second was not always enough on a loaded machine)
    monkeypatch.setenv(FAULT_ENV, "slow-commit=3")
    cluster = Cluster(initialize_head=True, head_node_args=cluster_head(num_cpus=2, num_gpus=1))
    try:
        cluster.add_node(num_cpus=2, num_gpus=1)
        out = "s3://outputs/two-nodes"
        result = subprocess.run(
            # float32: declared GPUs would resolve bf16, which a CPU runs ten times slower
            precompute(out, "--address", cluster.address, "--set", "vae.dtype=float32"),
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        cluster.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoder actors ready: 2 on cpu" in result.stderr
    report = json.loads(open_store(out).read_bytes("report.json"))
    assert sorted(report["actors"]) == ["w0", "w1"] and report["ok"] == 6
    # Declared GPUs make the job fingerprint "cuda" compute (run on the CPU here): the same clips as
    # the local run's, and a dataset that checks out.
    assert clips(out) == clips(local_run)
    assert validate(out).problems == []


def test_an_endpoint_named_in_the_aws_profile_serves_reads_and_writes(s3, tmp_path):
    """`endpoint_url` in ~/.aws/config (no AWS_ENDPOINT_URL): boto3 (writes) and pyarrow (listing,
    reads) both go to that server."""
    config = tmp_path / "aws-config"
    config.write_text(f"[profile moto]\nregion = us-east-1\nendpoint_url = {s3.env['AWS_ENDPOINT_URL']}\n")
    script = (
        "from jobs.dataset.store import S3Store\n"
        "from jobs.inputs.shards import list_shards\n"
        "store = S3Store('s3://outputs/profiled')\n"
        "assert store.create('x.json', b'{}')\n"
        "assert store.read_bytes('x.json') == b'{}' and store.list() == ['x.json']\n"
        "print(len(list_shards(['s3://inputs/data/shard-*.tar'])))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env.update(AWS_CONFIG_FILE=str(config), AWS_PROFILE="moto", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["3"], result.stderr[-3000:]
