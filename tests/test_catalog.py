"""job.json, commit markers, manifest.json and the lock: the dataset's control files, on real files."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time

import pytest

from jobs.dataset.catalog import (
    DatasetBusy,
    DatasetError,
    JobRecord,
    existing_job,
    output_lock,
    read_commit,
    read_job,
    write_job,
    write_manifest,
)
from jobs.dataset.layout import JOB_FILE, LOCK_FILE, MANIFEST_FILE, SHARD_ROW_KEY
from jobs.dataset.reader import read_metadata
from jobs.dataset.writer import ShardWriter

FINGERPRINT = "0123456789abcdef"


def _job() -> JobRecord:
    return JobRecord(FINGERPRINT, {"video": {"num_frames": 8}}, {"output": "x"}, ["/d/a.tar"], ["precompute"])


def test_job_file_round_trips(tmp_path):
    write_job(tmp_path, _job())
    assert read_job(tmp_path) == _job()
    assert existing_job(tmp_path) == _job()
    assert not [p for p in tmp_path.iterdir() if p.name != JOB_FILE]  # no temporaries left


def test_a_new_or_empty_directory_has_no_job_and_anything_else_is_refused(tmp_path):
    assert existing_job(tmp_path / "new") is None
    (tmp_path / LOCK_FILE).touch()
    assert existing_job(tmp_path) is None  # a lock alone: a job that died before writing job.json
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty and is not a latent dataset"):
        existing_job(tmp_path)
    (tmp_path / JOB_FILE).write_text("{not json")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        existing_job(tmp_path)
    (tmp_path / JOB_FILE).write_text('{"settings": {}}')
    with pytest.raises(DatasetError, match="is not a precompute job file"):
        read_job(tmp_path)
    with pytest.raises(DatasetError, match="no job.json"):
        read_job(tmp_path / "new")


def test_a_marker_is_read_back_and_one_that_cannot_be_read_is_an_error_not_an_absence(tmp_path):
    writer = ShardWriter(tmp_path, "s0", "/d/s0.tar", {"fingerprint": FINGERPRINT})
    writer.add_error("k", 0, "cannot open video")
    writer.add_shard_error("tar read error after 1 samples: ReadError: unexpected end of data")
    marker = writer.commit()
    assert read_commit(tmp_path, "s0", verify=True) == marker
    assert marker["fingerprint"] == FINGERPRINT and marker["source"] == "/d/s0.tar"
    assert read_commit(tmp_path, "s1") is None  # no marker: not committed
    # An I/O error (here a link that loops) says nothing about the commit: raised, not taken for "none"
    loop = tmp_path / "_commits" / "s1.json"
    loop.symlink_to(loop)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        read_commit(tmp_path, "s1")
    rows = read_metadata(tmp_path).to_pylist()
    assert [(r["key"], r["index"]) for r in rows] == [("k", 0), (SHARD_ROW_KEY, -1)]


def test_manifest_lists_the_markers_and_their_totals(tmp_path):
    markers = []
    for i in range(2):
        writer = ShardWriter(tmp_path, f"s{i}", f"/d/s{i}.tar", {"fingerprint": FINGERPRINT})
        for k in range(i + 1):
            writer.add_error(f"k{k}", k, "too short")
        markers.append(writer.commit())
    other = ShardWriter(tmp_path, "nested/s9", "/d/s9.tar", {"fingerprint": "f" * 16})
    other.add_error("k", 0, "too short")
    other.commit()  # a marker of other settings is not part of this dataset
    assert write_manifest(tmp_path, FINGERPRINT) == json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert [s["name"] for s in manifest["shards"]] == ["s0", "s1"]
    assert (manifest["samples"], manifest["errors"], manifest["ok"]) == (3, 3, 0)
    assert "committed_at" not in manifest["shards"][0] and manifest["fingerprint"] == FINGERPRINT


def test_one_writer_at_a_time(tmp_path):
    with output_lock(tmp_path):
        with pytest.raises(DatasetBusy, match="another precompute job is writing to"):
            with output_lock(tmp_path):
                pass
    with output_lock(tmp_path):  # released when the holder is done
        pass


def test_a_job_starting_while_a_reader_asks_whether_one_runs_still_starts(tmp_path):
    """`jobs.status` asks by holding the lock shared for an instant (here a tenth of a second): a
    job starting then is not told that another job writes the directory."""
    with output_lock(tmp_path):  # (makes the lock file)
        pass
    probe = os.open(tmp_path / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    release = threading.Timer(0.1, lambda: os.close(probe))
    started = time.monotonic()
    release.start()
    try:
        with output_lock(tmp_path):
            assert time.monotonic() - started >= 0.1  # it waited for the reader, and has the directory
    finally:
        release.join()


def test_a_job_killed_before_its_job_file_leaves_a_fresh_directory(tmp_path):
    (tmp_path / LOCK_FILE).touch()
    (tmp_path / ".job.json.0123456789ab.tmp").write_text("{")
    (tmp_path / "latents" / "a").mkdir(parents=True)
    (tmp_path / "latents" / "a" / ".x.tar.0123456789ab.tmp").write_bytes(b"partial")
    assert existing_job(tmp_path) is None
    (tmp_path / "latents" / "a" / "x.tar").write_bytes(b"final")  # a final-named file is not a leftover
    with pytest.raises(DatasetError, match="not empty"):
        existing_job(tmp_path)
