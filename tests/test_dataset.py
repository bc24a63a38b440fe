from __future__ import annotations

import fcntl
import os
import sys
import tarfile
import threading
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors

from jobs.dataset.catalog import read_commit, remove_uncommitted
from jobs.dataset.layout import SCHEMA
from jobs.dataset.reader import iter_shard, load_sample, read_metadata
from jobs.dataset.store import LocalStore, open_store
from jobs.dataset.writer import ShardWriter

CONSTANTS = {"fingerprint": "f" * 16, "vae": "flux-ae-tiny", "scale_factor": 0.5, "shift_factor": 0.1}


def _write(root, name="part-0", keys=("a", "dir/b", "c" * 150)):
    writer = ShardWriter(root, name, f"/data/{name}.tar", CONSTANTS)
    tensors = {}
    for i, key in enumerate(keys):
        tensors[key] = {"latent": torch.randn(4, 2, 3, 5, generator=torch.Generator().manual_seed(i))}
        writer.add(key, i, tensors[key], {"caption": f"caption {i}", "num_frames": 8, "meta": '{"x": 1}'})
    writer.add_error("broken", len(keys), "cannot open video", {"caption": "bad"})
    return writer, tensors


def test_commit_writes_all_files_and_no_temporaries(tmp_path):
    writer, tensors = _write(tmp_path)
    marker = writer.commit()
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["_commits/.part-0.lock", "_commits/part-0.json", "latents/part-0.tar", "meta/part-0.parquet"]
    assert marker["samples"] == 4 and marker["ok"] == 3 and marker["errors"] == 1 and marker["frames"] == 24
    assert read_commit(tmp_path, "part-0") == marker


def test_offsets_point_at_the_safetensors_bytes(tmp_path):
    writer, tensors = _write(tmp_path)
    writer.commit()
    table = read_metadata(tmp_path)
    assert table.schema.equals(SCHEMA)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]
    for row in rows[:3]:
        loaded = load_sample(tmp_path, row)
        assert torch.equal(loaded["latent"], tensors[row["key"]]["latent"])
        assert row["latent_shape"] == [4, 2, 3, 5] and row["latent_dtype"] == "float32"
        assert row["shard"] == "latents/part-0.tar" and row["source"] == "/data/part-0.tar"
        assert row["vae"] == "flux-ae-tiny" and row["scale_factor"] == 0.5
    error = rows[3]
    assert error["error"] == "cannot open video" and error["shard"] is None and error["offset"] is None
    with pytest.raises(ValueError, match="has no latents"):
        load_sample(tmp_path, error)


def test_plain_webdataset_and_duckdb_read_the_output(tmp_path):
    writer, tensors = _write(tmp_path)
    writer.commit()
    samples = list(wds.WebDataset(str(tmp_path / "latents" / "part-0.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["a", "dir/b", "c" * 150]
    for s in samples:
        assert torch.equal(load_safetensors(s["safetensors"])["latent"], tensors[s["__key__"]]["latent"])
        assert s["json"]["latent_shape"] == [4, 2, 3, 5] and s["json"]["meta"] == {"x": 1}
    assert [k for k, _ in iter_shard(tmp_path / "latents" / "part-0.tar")] == ["a", "dir/b", "c" * 150]
    glob = f"{tmp_path}/**/*.parquet"
    assert duckdb.sql(f"SELECT count(*) FROM '{glob}'").fetchall() == [(4,)]
    assert duckdb.sql(f"SELECT count(*) FROM '{glob}' WHERE status = 'error'").fetchall() == [(1,)]


def test_abort_and_crash_leave_nothing_visible(tmp_path):
    writer, _ = _write(tmp_path)
    writer.abort()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    # A crash (no abort, no commit) leaves only hidden temporaries, which the next run removes.
    _write(tmp_path, "part-1")
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers and all(p.name.startswith(".") and p.name.endswith(".tmp") for p in leftovers)
    assert read_commit(tmp_path, "part-1") is None
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("*.tar"))
    assert LocalStore(tmp_path).cleanup() == len(leftovers)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_commit_marker_is_checked_against_the_files(tmp_path):
    writer, _ = _write(tmp_path)
    writer.commit()
    tar = tmp_path / "latents" / "part-0.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])  # a damaged shard is not "done"
    assert read_commit(tmp_path, "part-0") is None


def test_parquet_is_deterministic(tmp_path):
    for sub in ("x", "y"):
        writer, _ = _write(tmp_path / sub)
        writer.commit()
    for rel in ("latents/part-0.tar", "meta/part-0.parquet"):
        assert (tmp_path / "x" / rel).read_bytes() == (tmp_path / "y" / rel).read_bytes()
    assert pq.read_schema(tmp_path / "x" / "meta" / "part-0.parquet").equals(SCHEMA)


def _files(root):
    """Every file but the shards' commit locks (empty files that only ever get locked)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".lock")


@pytest.mark.parametrize("cut", ["between members", "in a header"])
def test_a_latent_tar_cut_short_is_an_error_when_read_in_order(tmp_path, cut):
    """Python's tarfile ends quietly where a cut falls between members or inside a header: a reader
    would take the first samples for the whole shard."""
    _write(tmp_path)[0].commit()
    tar = tmp_path / "latents" / "part-0.tar"
    with tarfile.open(tar) as t:
        second = t.getmembers()[1].offset  # its header's start
    data = tar.read_bytes()
    tar.write_bytes(data[: second if cut == "between members" else second + 100])
    with pytest.raises(tarfile.ReadError, match="cut short after"):
        list(iter_shard(tar))


def test_metadata_is_read_from_committed_shards_only(tmp_path):
    """Rows of a Parquet file that no marker names (an attempt killed between publishing its files
    and its marker) or names with another size (a later attempt's, over an earlier one's) are not
    read: they may point into a tar of another attempt."""
    _write(tmp_path)[0].commit()
    _write(tmp_path, "part-1", keys=("d",))[0].commit()
    meta = tmp_path / "meta"
    (meta / "part-2.parquet").write_bytes((meta / "part-0.parquet").read_bytes())  # no marker
    (meta / "part-1.parquet").write_bytes((meta / "part-0.parquet").read_bytes())  # not the marker's
    rows = read_metadata(tmp_path).to_pylist()
    assert [r["key"] for r in rows] == ["a", "dir/b", "c" * 150, "broken"]


@pytest.mark.parametrize("blocked", ["meta/part-0.parquet", "_commits/part-0.json"])
def test_a_failed_commit_leaves_no_final_file_and_no_marker(tmp_path, blocked):
    """The rename of the Parquet file fails (a non-empty folder where it must go), or the marker
    cannot be made (a dangling link in its place: no marker to read, and the name taken): nothing
    of the shard stays visible."""
    target = tmp_path / blocked
    target.parent.mkdir(parents=True)
    if blocked.startswith("meta"):
        target.mkdir()
        (target / "x").touch()
        left = [f"{blocked}/x"]
    else:
        target.symlink_to(tmp_path / "nowhere")
        left = []
    writer, _ = _write(tmp_path)
    store, deleted = writer.store, []
    real_delete = store.delete

    def delete(rel, version=None):  # the real delete, noting whether the shard's commit lock is held meanwhile
        deleted.append((rel, store.lock_held("_commits/.part-0.lock")))
        return real_delete(rel, version)

    store.delete = delete
    with pytest.raises(OSError):
        writer.commit()
    # What it had published is taken back before the lock is let go: a later attempt that commits
    # the shard once the lock is free never has its files removed by this one.
    assert ("latents/part-0.tar", True) in deleted and all(held for _, held in deleted)
    assert [f for f in _files(tmp_path) if not f.endswith(".tmp")] == left  # no final file
    writer.abort()
    assert _files(tmp_path) == left  # and no temporary
    assert read_commit(tmp_path, "part-0") is None


def test_a_stopped_job_removes_shards_left_between_their_files_and_marker(tmp_path):
    """`remove_uncommitted`: a shard with files and no marker goes; a committed one stays, and so
    does one whose commit lock an attempt holds (it is still committing)."""
    _write(tmp_path, "done")[0].commit()
    for name in ("orphan", "dir/orphan", "busy"):
        writer, _ = _write(tmp_path, name)
        writer.commit()
        (tmp_path / "_commits" / f"{name}.json").unlink()  # as if killed just before its marker
    lock = tmp_path / "_commits" / ".busy.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert remove_uncommitted(tmp_path, patience=0.5) == ["dir/orphan", "orphan"]
    assert _files(tmp_path) == [
        "_commits/done.json",
        "latents/busy.tar",
        "latents/done.tar",
        "meta/busy.parquet",
        "meta/done.parquet",
    ]
    assert remove_uncommitted(tmp_path) == ["busy"]  # its lock is free now


def test_a_late_attempt_never_rewrites_a_committed_shard(tmp_path):
    """A "zombie" attempt (its shard was retried elsewhere and committed) finishes after: it keeps
    nothing of its own and returns the committed marker; the committed files are untouched."""
    first, _ = _write(tmp_path)
    late, _ = _write(tmp_path)  # started before the first one committed
    marker = first.commit()
    paths = [tmp_path / p for p in ("_commits/part-0.json", "latents/part-0.tar", "meta/part-0.parquet")]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    assert late.commit() == marker
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == before
    assert _files(tmp_path) == ["_commits/part-0.json", "latents/part-0.tar", "meta/part-0.parquet"]


def test_a_commit_waits_for_the_shards_commit_lock(tmp_path):
    writer, _ = _write(tmp_path)
    lock = tmp_path / "_commits" / ".part-0.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another attempt is committing this shard
        thread = threading.Thread(target=writer.commit)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and read_commit(tmp_path, "part-0") is None
        fcntl.flock(held, fcntl.LOCK_UN)
    thread.join(10)
    assert not thread.is_alive() and read_commit(tmp_path, "part-0") is not None


def test_every_file_is_fsynced_before_its_rename_and_the_folders_after(tmp_path, monkeypatch):
    """Spies on the real `os.fsync` (it still runs) and on renames (the data files) and links (the
    marker, created only if absent) through Python's audit events."""
    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def audit(event, args):
        if event in ("os.rename", "os.link"):
            events.append(("rename", str(args[0])))
        elif event == "os.mkdir":
            events.append(("mkdir", str(args[0])))

    monkeypatch.setattr(os, "fsync", fsync)
    sys.addaudithook(audit)  # audit hooks cannot be removed; this one records only while `events` is read here
    writer, _ = _write(tmp_path)
    writer.commit()
    done = list(events)
    events.clear()
    renamed = [path for kind, path in done if kind == "rename"]
    assert len(renamed) == 3 and [Path(p).name.split(".")[1] for p in renamed] == ["part-0", "part-0", "part-0"]
    assert [Path(p).parent.name for p in renamed] == ["latents", "meta", "_commits"]  # the marker last
    for path in renamed:
        i = done.index(("rename", path))
        assert ("fsync", path) in done[:i], f"{path} renamed before it was fsynced"
    marker_at = done.index(("rename", renamed[2]))
    for path in renamed[:2]:  # each data file's folder is synced after its rename, before the marker
        synced = [i for i, e in enumerate(done) if e == ("fsync", str(Path(path).parent))]
        assert any(done.index(("rename", path)) < i < marker_at for i in synced), path
    assert ("fsync", str(tmp_path / "_commits")) in done[marker_at:]
    # Each folder the commit made (`latents`, `meta`, `_commits`) is in its parent for good before the
    # marker is: its parent is synced after it is made
    made = [path for kind, path in done if kind == "mkdir" and Path(path).is_dir()]
    assert sorted(Path(p).name for p in made) == ["_commits", "latents", "meta"]
    for path in made:
        after = done[done.index(("mkdir", path)) : marker_at]
        assert ("fsync", str(Path(path).parent)) in after, f"{path} made, its folder not synced before the marker"


def test_a_same_size_corruption_fails_verification(tmp_path):
    writer, _ = _write(tmp_path)
    marker = writer.commit()
    tar = tmp_path / marker["latents"]["path"]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert read_commit(tmp_path, "part-0") == marker  # sizes only: cheap
    assert read_commit(tmp_path, "part-0", verify=True) is None


def test_fields_a_column_cannot_hold_are_made_safe_not_fatal(tmp_path):
    writer = ShardWriter(tmp_path, "s", "/d/s.tar", CONSTANTS)
    latent = {"latent": torch.zeros(4, 1, 2, 2)}
    writer.add("huge", 0, latent, {"num_frames": 8, "src_num_frames": 4_026_531_840, "caption": "a \ud800 b"})
    writer.add_error("bad\udcff", 1, "no video", {"caption": "\udcff", "src_width": 2**40})
    writer.commit()
    rows = read_metadata(tmp_path).to_pylist()
    assert rows[0]["status"] == "ok" and rows[0]["src_num_frames"] is None and rows[0]["caption"] == "a \\ud800 b"
    assert rows[1]["key"] == "bad\\udcff" and rows[1]["src_width"] is None


def test_member_names_are_safe_relative_paths_and_rows_keep_the_key(tmp_path):
    keys = ["../../escape", "/abs/olute", "ok/fine", "k" * 300]
    writer = ShardWriter(tmp_path, "s", "/d/s.tar", CONSTANTS)
    for i, key in enumerate(keys):
        writer.add(key, i, {"latent": torch.full((4, 1, 2, 2), float(i))}, {"num_frames": 1})
    writer.commit()
    with tarfile.open(tmp_path / "latents" / "s.tar") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "x", filter="data")  # would refuse an escaping name
    assert len(names) == 8 and len(set(names)) == 8
    assert all(not n.startswith("/") and ".." not in n.split("/") and len(n.encode()) < 255 for n in names)
    assert "ok/fine.safetensors" in names
    rows = read_metadata(tmp_path).to_pylist()
    assert [r["key"] for r in rows] == keys
    for i, row in enumerate(rows):
        assert load_sample(tmp_path, row)["latent"].max().item() == i


def test_a_local_marker_is_created_only_if_absent(tmp_path):
    store = LocalStore(tmp_path)
    assert store.create("_commits/m.json", b"first") and not store.create("_commits/m.json", b"second")
    assert store.read_bytes("_commits/m.json") == b"first"
    assert store.list() == ["_commits/m.json"]  # no temporary left by the refused one
    with pytest.raises(ValueError, match="cannot keep a dataset at 'gs://b/x'"):
        open_store("gs://b/x")
