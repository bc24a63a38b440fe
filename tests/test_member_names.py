"""`member_stem` and the latent tar it names: no sample key, however crafted, places a file
outside the folder a tar is extracted to, or makes webdataset read the tar wrongly."""

import hashlib
import json
import tarfile

import pytest
import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors
from webdataset.tariterators import base_plus_ext

from jobs.dataset.layout import MAX_MEMBER_STEM, member_stem
from jobs.dataset.reader import iter_shard, load_sample, read_metadata
from jobs.dataset.writer import ShardWriter

CONSTANTS = {"fingerprint": "f" * 16, "vae": "flux-ae-tiny", "scale_factor": 0.5, "shift_factor": 0.1}

ORDINARY = ["fine", "dir/b", "c" * 150, "a.b/c", "x" * MAX_MEMBER_STEM, "__shard__", "été/日本"]
HOSTILE = [
    "a\x00b",  # NUL
    "\x00",
    "k" * 10_000,  # 10 kB
    "k" * 9_999 + "\x00",
    "../x",
    "/abs/path",
    "a/../../b",
    "..",
    ".",
    "",
    "a//b",
    "a/",
    "a\\b",
    "..\\..\\x",
    "line\nbreak",
    "del\x7f",
    "clip.v2",  # a dot in the last part: webdataset would cut the key there
    ".hidden",
    "a/b.c.d",
    "a" * 179 + "/v1.2/" + "b" * 30,  # the cut ends inside a dotted folder name
    "a" * 182 + "/" + "b" * 30,  # the cut ends at a slash
    "u\x01v",  # these three differ only in characters that are cleaned
    "u\x02v",
    "u\\v",
    "__meta__/x",  # webdataset skips members under such a first folder
    "é" * 150,  # two-byte characters over the limit, cut inside one
    "😀" * 60,
    "日本/" * 30 + "\x00",
]


def _assert_safe(stem):
    assert isinstance(stem, str) and stem.encode("utf-8")  # valid UTF-8, no lone surrogate
    assert len(stem.encode()) <= MAX_MEMBER_STEM, len(stem.encode())
    assert not stem.startswith("/") and not stem.endswith("/")
    parts = stem.split("/")
    assert all(p not in ("", ".", "..") for p in parts), stem
    assert not any(ord(c) < 0x20 or c in "\x7f\\" for c in stem), stem
    assert "." not in parts[-1], stem
    # webdataset's own split gives the stem back as the key, and the suffix whole.
    assert base_plus_ext(f"{stem}.safetensors") == (stem, "safetensors")
    assert not (len(parts) > 1 and parts[0].startswith("__") and parts[0].endswith("__")), stem


@pytest.mark.parametrize("key", ORDINARY)
def test_an_ordinary_key_is_its_own_stem(key):
    assert member_stem(key) == key
    assert member_stem(key, 7) == f"{key}_c007"


def test_hashed_stems_are_those_of_earlier_runs():
    """Existing outputs are compared byte for byte across runs: the cleaning of keys that were
    hashed before stays as it was."""
    digest = hashlib.sha256(b"../x").hexdigest()[:16]
    assert member_stem("../x") == f"_/x~{digest}"
    assert member_stem("a\\b") == "a_b~" + hashlib.sha256(b"a\\b").hexdigest()[:16]
    assert member_stem("/abs/path", 3) == f"abs/path~{hashlib.sha256(b'/abs/path').hexdigest()[:16]}_c003"


@pytest.mark.parametrize("key", HOSTILE, ids=range(len(HOSTILE)))
def test_a_hostile_key_gets_a_safe_stem(key):
    _assert_safe(member_stem(key))
    _assert_safe(member_stem(key, 2).removesuffix("_c002"))
    assert member_stem(key) != key


def test_nul_and_length_are_cleaned_whatever_else_the_key_is():
    """A key that is otherwise a safe relative path is not left as it is for a NUL alone, or for
    its length alone."""
    assert "\x00" not in member_stem("a\x00b") and member_stem("a\x00b").startswith("a_b~")
    assert len(member_stem("k" * 10_000).encode()) == MAX_MEMBER_STEM
    assert len(member_stem("k" * (MAX_MEMBER_STEM + 1)).encode()) <= MAX_MEMBER_STEM


def test_a_cut_inside_a_dotted_folder_leaves_no_dot_in_the_last_part():
    stem = member_stem("a" * 179 + "/v1.2/" + "b" * 30)
    assert stem.startswith("a" * 179 + "/v1_") and stem.count("/") == 1
    assert member_stem("d.1/" + "e" * 300).startswith("d.1/eee")  # dots in folders stay


def test_a_cut_inside_a_multibyte_character_drops_the_whole_character():
    stem = member_stem("é" * 150)
    assert stem.startswith("é" * 91 + "~") and len(stem.encode()) == 182 + 17


def test_keys_differing_only_in_cleaned_characters_get_distinct_stems():
    stems = {member_stem(k) for k in ("u\x01v", "u\x02v", "u\\v", "u\x00v")}
    assert len(stems) == 4 and all(s.startswith("u_v~") for s in stems)


def _tensors(i):
    return {"latent": torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(i))}


def _add(writer, key, index, tensors):
    """As the worker does: a sample the writer refuses becomes an error row."""
    try:
        writer.add(key, index, tensors, {"caption": f"caption {index}", "num_frames": 1})
    except ValueError as e:
        writer.add_error(key, index, str(e))


def test_a_key_spelled_like_another_keys_stem_is_an_error_row_naming_it(tmp_path):
    taken = member_stem("a\\b")
    writer = ShardWriter(tmp_path, "part-0", "/data/part-0.tar", CONSTANTS)
    _add(writer, "a\\b", 0, _tensors(0))
    _add(writer, taken, 1, _tensors(1))
    writer.commit()
    rows = read_metadata(tmp_path).to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [("a\\b", "ok"), (taken, "error")]
    assert rows[1]["error"] == f"cannot store the sample: its member name {taken!r} is taken by the sample 'a\\\\b'"
    samples = list(wds.WebDataset(str(tmp_path / rows[0]["shard"]), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [taken]


def test_every_crafted_key_in_one_shard_reads_back_once_and_extracts_inside(tmp_path):
    # Two keys spelled like another's stem: one before that key, one after it.
    keys = ORDINARY + [member_stem("a\\b")] + HOSTILE + [member_stem("../x")]
    out = tmp_path / "out"
    writer = ShardWriter(out, "part-0", "/data/part-0.tar", CONSTANTS)
    tensors = {i: _tensors(i) for i in range(len(keys))}
    for i, key in enumerate(keys):
        _add(writer, key, i, tensors[i])
    writer.commit()
    rows = read_metadata(out).to_pylist()
    assert [r["index"] for r in rows] == list(range(len(keys)))
    errors = [r["key"] for r in rows if r["status"] == "error"]
    assert errors == ["a\\b", member_stem("../x")]  # the second of each pair: its stem was taken
    ok = {member_stem(r["key"]): r for r in rows if r["status"] == "ok"}
    assert len(ok) == len(keys) - 2
    tar_path = out / "latents" / "part-0.tar"

    samples = list(wds.WebDataset(str(tar_path), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(ok)  # each once, under its row's stem
    for s in samples:
        row = ok[s["__key__"]]
        assert {k for k in s if not k.startswith("__")} == {"safetensors", "json"}
        assert json.loads(s["json"])["key"] == row["key"]
        assert torch.equal(load_safetensors(s["safetensors"])["latent"], tensors[row["index"]]["latent"])
    assert [k for k, _ in iter_shard(tar_path)] == [k for k in ok]
    for row in ok.values():
        assert torch.equal(load_sample(out, row)["latent"], tensors[row["index"]]["latent"])

    dest = tmp_path / "extracted"
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")  # raises on any member that would leave `dest`
        names = tar.getnames()
    assert len(names) == 2 * len(ok)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    extracted = [p for p in files if dest in p.parents]
    assert len(extracted) == len(names)
    assert all(p.resolve().is_relative_to(dest.resolve()) for p in extracted)
    assert all(dest in p.parents or out in p.parents for p in files)
    assert {str(p.relative_to(out)) for p in files if out in p.parents} == {
        "latents/part-0.tar",
        "meta/part-0.parquet",
        "_commits/part-0.json",
        "_commits/.part-0.lock",
    }
