from __future__ import annotations

import json

from jobs.demo_data import write_shard
from jobs.inputs.shards import LocalStorage, StreamStorage, storage_for
from jobs.inputs.tar_samples import RawSample, read_shard, split_sample

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

    errors.clear()
    assert list(read_shard(str(tmp_path / "missing.tar"), errors.append)) == []
    assert isinstance(errors[0], FileNotFoundError)


def test_each_source_is_opened_by_the_storage_of_its_form(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [("a", {"mp4": b"1", "txt": b"x"}), ("b", {"mp4": b"2"})])
    assert isinstance(storage_for(str(path)), LocalStorage)
    assert isinstance(storage_for(f"pipe:cat {path}"), StreamStorage)
    local = [(s.key, s.files) for s in read_shard(str(path), print)]
    piped = [(s.key, s.files) for s in read_shard(f"pipe:cat {path}", print)]
    assert local == piped == [("a", {"mp4": b"1", "txt": b"x"}), ("b", {"mp4": b"2"})]
    errors: list[Exception] = []
    assert list(read_shard(str(tmp_path / "gone.tar"), errors.append)) == []
    assert isinstance(errors[0], FileNotFoundError) and errors[0].args[-1] == str(tmp_path / "gone.tar")
