from __future__ import annotations

import gzip
import http.server
import json
import tarfile
import threading

import pytest
from fixtures.hostile import make_hostile

from jobs.demo_data import write_shard
from jobs.inputs.shards import HttpStorage, LocalStorage, ShellRefused, ShellStorage, storage_for
from jobs.inputs.tar_samples import RawSample, ShardReadError, read_shard, split_sample

EXTS = ["mp4", "mkv"]


def test_split_sample_caption_sources():
    parts = split_sample(RawSample("a", 0, {"mp4": b"v", "txt": b" a cat \n"}), EXTS)
    assert parts.video == b"v" and parts.caption == "a cat" and parts.meta is None
    meta = json.dumps({"caption": "a dog", "fps": 24}).encode()
    parts = split_sample(RawSample("b", 1, {"mkv": b"v", "json": meta}), EXTS)
    assert parts.caption == "a dog" and json.loads(parts.meta) == {"caption": "a dog", "fps": 24}
    parts = split_sample(RawSample("c", 2, {"mp4": b"v", "json": b'{"text": "t"}'}), EXTS)
    assert parts.caption == "t"
    assert split_sample(RawSample("d", 3, {"mp4": b"v"}), EXTS).caption is None
    parts = split_sample(
        RawSample("e", 4, {"mp4": b"v", "caption": b" from .caption\n", "json": b'{"caption": "j"}'}), EXTS
    )
    assert parts.caption == "from .caption" and parts.meta == '{"caption": "j"}'


def test_split_sample_problems_keep_what_is_there():
    parts = split_sample(RawSample("a", 0, {"json": b'{"caption": "c"}', "txt": b"x"}), EXTS)
    assert parts.problem == "no video member (looked for mp4, mkv; found json, txt)"
    assert parts.video is None and parts.caption == "x" and parts.meta == '{"caption": "c"}'
    parts = split_sample(RawSample("a", 0, {"mp4": b"v", "json": b"{oops"}), EXTS)
    assert parts.problem.startswith("invalid .json member") and parts.meta == "{oops"


def test_read_shard_in_order_with_problems_reported(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [(f"k{i}", {"mp4": b"x" * 700, "txt": b"c"}) for i in range(4)])
    errors = []
    assert [(s.key, s.index) for s in read_shard(str(path), errors.append)] == [(f"k{i}", i) for i in range(4)]
    assert errors == []

    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: 2 * 2560 + 600])  # 2560 bytes a sample: ends inside the third
    samples = list(read_shard(str(cut), errors.append))
    assert [s.key for s in samples][:2] == ["k0", "k1"]
    assert errors and any("unexpected end of data" in str(e) or "truncated" in str(e).lower() for e in errors)

    with pytest.raises(ShardReadError, match="cannot open .*missing.tar: FileNotFoundError"):
        list(read_shard(str(tmp_path / "missing.tar"), errors.append))


def test_each_source_is_opened_by_the_storage_of_its_form(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [("a", {"mp4": b"1", "txt": b"x"}), ("b", {"mp4": b"2"})])
    assert isinstance(storage_for(str(path)), LocalStorage)
    assert isinstance(storage_for(f"pipe:cat {path}", allow_shell=True), ShellStorage)
    assert isinstance(storage_for("https://host/x.tar"), HttpStorage)
    local = [(s.key, s.files) for s in read_shard(str(path), print)]
    piped = [(s.key, s.files) for s in read_shard(f"pipe:cat {path}", print, allow_shell=True)]
    assert local == piped == [("a", {"mp4": b"1", "txt": b"x"}), ("b", {"mp4": b"2"})]
    with pytest.raises(ShardReadError, match="gone.tar"):
        list(read_shard(str(tmp_path / "gone.tar"), print))


def _read(path, **kw):
    damage: list[str] = []
    samples = list(read_shard(str(path), damage.append, **kw))
    return samples, damage


@pytest.mark.parametrize("make", [make_hostile.cut_at_header, make_hostile.cut_inside_header])
def test_a_tar_cut_between_or_inside_headers_is_damage_with_its_offset(tmp_path, make):
    path = tmp_path / "cut.tar"
    path.write_bytes(make())
    samples, damage = _read(path)
    assert [s.key for s in samples] == ["k0", "k1"]  # what came before the cut is kept
    with tarfile.open(path, "r:") as tar:  # Python's tarfile reads the cut tar as a whole one
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    assert damage == [
        f"tar cut short: no end-of-archive blocks at byte {end}, after the last member read; "
        f"it ends at byte {path.stat().st_size}, and whatever members followed are missing"
    ]


def test_a_whole_tar_has_no_damage_even_compressed(tmp_path):
    data = make_hostile.tar_bytes(make_hostile.good_members(["a", "b"]))
    for name, blob in [("s.tar", data), ("s.tar.gz", gzip.compress(data, mtime=0))]:
        (tmp_path / name).write_bytes(blob)
        samples, damage = _read(tmp_path / name)
        assert [s.key for s in samples] == ["a", "b"] and damage == []


def test_every_member_ends_up_in_a_sample(tmp_path):
    path = tmp_path / "odd.tar"
    path.write_bytes(make_hostile.odd_members())
    samples, damage = _read(path)
    assert damage == []
    problems = {s.key: s.problem for s in samples}
    assert list(problems) == ["ok-0", ".hidden.mp4", "README", "bad\\xff", "twice", "ok-1", "link"]
    assert problems["ok-0"] is None and problems["ok-1"] is None and problems["bad\\xff"] is None
    assert "has no sample key" in problems[".hidden.mp4"] and "has no sample key" in problems["README"]
    assert "duplicate member twice.mp4" in problems["twice"]
    assert "link.mp4: not a regular file" in problems["link"]
    assert [s.index for s in samples] == list(range(7))


def test_members_over_the_size_limit_are_not_read(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [("small", {"mp4": b"x" * 10}), ("big", {"mp4": b"x" * 5000, "txt": b"t"})])
    samples, damage = _read(path, max_member_bytes=1000)
    assert [(s.key, s.problem) for s in samples][0] == ("small", None)
    assert samples[1].key == "big" and samples[1].files == {"txt": b"t"}
    assert samples[1].problem == "big.mp4: member of 5000 bytes is over the limit of 1000" and len(samples) == 2


def test_a_sample_whose_members_together_are_over_the_limit_is_not_kept(tmp_path):
    path = tmp_path / "s.tar"
    members = {f"{i}.json": b"x" * 400 for i in range(5)}  # each under the limit, 2,000 bytes together
    write_shard(path, [("many", members), ("after", {"mp4": b"y" * 900})])
    samples, damage = _read(path, max_member_bytes=1000)
    assert samples[0].key == "many" and samples[0].files == {}
    assert samples[0].problem == "the sample's members hold over 1000 bytes (limits.max_member_bytes)"
    assert (samples[1].key, samples[1].problem, samples[1].files) == ("after", None, {"mp4": b"y" * 900})


def test_a_stream_that_fails_is_not_damage_but_a_failed_read(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [("a", {"mp4": b"1"})])
    with pytest.raises(ShardReadError, match="exit 1"):
        list(read_shard(f"pipe:cat {tmp_path / 'nope.tar'}", print, allow_shell=True))
    with pytest.raises(ShardReadError, match="exit 3"):  # a whole tar, then the command fails
        list(read_shard(f"pipe:cat {path}; exit 3", print, allow_shell=True))
    assert [s.key for s in read_shard(f"pipe:cat {path}", print, allow_shell=True)] == ["a"]


def test_a_shell_command_runs_only_with_the_users_opt_in(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ShellRefused, match="pass --allow-shell"):
        list(read_shard(f"pipe:touch {marker}; cat /dev/null", print))
    with pytest.raises(ShellRefused):
        storage_for(f"pipe:touch {marker}")
    with pytest.raises(ValueError, match="cannot read 'ftp://b/x.tar'"):
        storage_for("ftp://b/x.tar")
    assert not marker.exists()


class _Server(http.server.BaseHTTPRequestHandler):
    """Serves the tar at `/s.tar`; `/cut.tar` sends a Content-Length and then only part of it."""

    data = b""

    def do_GET(self):
        whole = self.path == "/s.tar"
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data if whole else self.data[: len(self.data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [(f"k{i}", {"mp4": bytes([i]) * 3000}) for i in range(3)])
    _Server.data = path.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_sources_are_read_without_a_shell_and_a_dropped_connection_fails_the_read(http_server):
    assert [s.key for s in read_shard(f"{http_server}/s.tar", print)] == ["k0", "k1", "k2"]
    with pytest.raises(
        ShardReadError,
        match="at byte 10240: ConnectionError: the connection closed with 10240 of 20480 bytes not received",
    ):
        list(read_shard(f"{http_server}/cut.tar", print))
