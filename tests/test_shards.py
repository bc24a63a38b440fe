from __future__ import annotations

import io
import tarfile

import pytest

from jobs.demo_data import write_shard
from jobs.inputs.shards import ShellRefused, count_samples, list_shards, sample_key, storage_for


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w"):
        pass
    return path


def test_path_glob_brace_and_directory(tmp_path):
    for i in range(3):
        _touch(tmp_path / "data" / f"shard-{i:06d}.tar")
    _touch(tmp_path / "data" / "sub" / "part-0.tar")

    one = list_shards([str(tmp_path / "data" / "shard-000001.tar")])
    assert [s.name for s in one] == ["shard-000001"]
    assert one[0].source == str(tmp_path / "data" / "shard-000001.tar") and one[0].is_local

    brace = list_shards([str(tmp_path / "data" / "shard-{000000..000002}.tar")])
    assert [s.name for s in brace] == ["shard-000000", "shard-000001", "shard-000002"]

    globbed = list_shards([str(tmp_path / "data" / "*" / "*.tar")])
    assert [s.name for s in globbed] == ["sub/part-0"]

    directory = list_shards([str(tmp_path / "data")])
    assert [s.name for s in directory] == ["shard-000000", "shard-000001", "shard-000002", "sub/part-0"]

    # The same shard named twice is listed once.
    assert len(list_shards([str(tmp_path / "data" / "shard-000000.tar")] * 2)) == 1


def test_file_urls_are_their_paths(tmp_path):
    """`file://` URLs name the same shards as their paths (names and sources alike), and open."""
    for i in range(2):
        write_shard(tmp_path / "my data" / f"shard-{i:06d}.tar", [(f"k{i}", {"txt": b"x"})])
    plain = list_shards([str(tmp_path / "my data" / "shard-{000000..000001}.tar")])
    urls = [
        f"file://{tmp_path}/my%20data/shard-{{000000..000001}}.tar",
        f"file://localhost{tmp_path}/my data",
        f"file://{tmp_path}/my data/shard-00000?.tar",  # a glob's `?` is the path's, not a URL query
    ]
    for url in urls:
        shards = list_shards([url])
        assert [(s.name, s.source) for s in shards] == [(s.name, s.source) for s in plain]
    source = f"file://{tmp_path}/my%20data/shard-000001.tar"  # (a source named by data opens too)
    with storage_for(source).open(source) as f:
        assert f.read() == (tmp_path / "my data" / "shard-000001.tar").read_bytes()
    with pytest.raises(ValueError, match="a file:// URL of another host"):
        list_shards([f"file://elsewhere{tmp_path}/my data"])


def test_same_basename_in_two_folders_does_not_collide(tmp_path):
    _touch(tmp_path / "a" / "x.tar")
    _touch(tmp_path / "b" / "x.tar")
    shards = list_shards([str(tmp_path / "*" / "x.tar")])
    assert [s.name for s in shards] == ["a/x", "b/x"]
    with pytest.raises(ValueError, match="would both be written as 'x'"):
        list_shards([str(tmp_path / "a" / "x.tar"), str(tmp_path / "b" / "x.tar")])


def test_missing_inputs_are_errors(tmp_path):
    _touch(tmp_path / "shard-000000.tar")
    with pytest.raises(ValueError, match="input shard not found: .*shard-000001.tar"):
        list_shards([str(tmp_path / "shard-{000000..000001}.tar")])
    with pytest.raises(ValueError, match="matches no file"):
        list_shards([str(tmp_path / "nothing-*.tar")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar files under directory"):
        list_shards([str(tmp_path / "empty")])


def test_urls_pass_through():
    specs = ["pipe:aws s3 cp s3://bucket/videos/shard-{0..1}.tar -", "https://host/d/clips-7.tar"]
    with pytest.raises(ShellRefused, match="pass --allow-shell"):  # a shell command only on the user's word
        list_shards(specs)
    shards = list_shards(specs, allow_shell=True)
    assert [s.name for s in shards] == ["shard-0", "shard-1", "clips-7"]
    assert not shards[0].is_local
    assert shards[0].source == "pipe:aws s3 cp s3://bucket/videos/shard-0.tar -"


def test_sample_key_follows_webdataset():
    assert sample_key("clip-1.mp4") == "clip-1"
    assert sample_key("dir.v2/clip-1.seg.mp4") == "dir.v2/clip-1"
    assert sample_key("README") is None


def test_count_samples(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["a.mp4", "a.txt", "b.mp4", "c.json", "c.mp4"]:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    assert count_samples(path) == 3
    data = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 512 * 5])  # truncated: counts what is readable
    assert 1 <= count_samples(tmp_path / "cut.tar") <= 3


def test_a_folder_named_like_a_tar_is_not_a_shard_and_names_never_clash_with_folders(tmp_path):
    write_shard(tmp_path / "a" / "x.tar" / "y.tar", [("k", {"mp4": b"1"})])  # a folder named x.tar
    write_shard(tmp_path / "b" / "x.tar", [("k", {"mp4": b"1"})])
    assert [s.name for s in list_shards([str(tmp_path / "a")])] == ["x.tar/y"]
    with pytest.raises(ValueError, match="matches no file"):  # a glob takes files only too
        list_shards([str(tmp_path / "a" / "*.tar")])
    with pytest.raises(ValueError, match=r"the output of the first, 'x.tar', is a folder of the second's"):
        list_shards([str(tmp_path / "a"), str(tmp_path / "b" / "*.tar")])
