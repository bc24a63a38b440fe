"""`python -m jobs.validate`: a sound output passes; each kind of damage is named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import small_config

from jobs import validate
from jobs.dataset.catalog import write_manifest
from jobs.dataset.layout import SCHEMA, ShardFiles
from jobs.demo_data import write_demo_dataset
from jobs.orchestration.driver import prepare_output
from jobs.orchestration.settings import check_config, make_plan
from jobs.orchestration.worker import ShardEncoder
from vae.checkpoint import file_sha256


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two committed shards of three demo videos and a manifest, as a finished job leaves them."""
    root = tmp_path_factory.mktemp("validate")
    shards = write_demo_dataset(root / "data", shards=2, samples_per_shard=3, seed=2)
    config = small_config(shards, root / "out")
    plan = make_plan(config, check_config(config), has_gpus=False)
    prepare_output(plan)
    encoder = ShardEncoder(plan.config, str(plan.root), plan.constants)
    for shard in plan.shards:
        list(encoder.encode_shard(shard))
    write_manifest(plan.root, plan.fingerprint)
    return root / "out"


@pytest.fixture
def out(finished, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(finished, copy)
    return copy


def problems(root, quick=False) -> list[str]:
    return validate.validate(root, quick=quick).problems


def marker_of(root, name="shard-000000"):
    path = root / ShardFiles(name).commit
    return path, json.loads(path.read_text())


def test_a_finished_run_is_valid(out, capsys):
    assert validate.main([str(out)]) == 0
    assert "valid; 2 committed shards, 6 rows (6 ok, 0 errors)" in capsys.readouterr().out


def test_an_unfinished_run_is_valid_and_says_how_far_it_got(out, capsys):
    (out / "manifest.json").unlink()
    (out / ShardFiles("shard-000001").commit).unlink()
    for name in (ShardFiles("shard-000001").latents, ShardFiles("shard-000001").meta):
        folder, file = name.split("/")
        (out / name).rename(out / folder / f".{file}.0123456789ab.tmp")  # a write the kill interrupted
    assert validate.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no manifest.json: the job has not finished (1 shards committed so far)" in printed
    assert "2 temporaries of an interrupted write" in printed


def test_a_changed_byte_is_found_by_its_sha256(out):
    tar = out / ShardFiles("shard-000000").latents
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert problems(out) == ["latents/shard-000000.tar: sha256 differs from the marker's (the file changed)"]
    assert problems(out, quick=True) == []  # sizes only


def test_a_file_no_marker_names_is_a_stray_that_a_reader_would_take_for_data(out):
    (out / ShardFiles("shard-000001").commit).unlink()  # a crash after the renames, before the marker
    (out / "manifest.json").unlink()
    assert problems(out) == [
        "latents/shard-000001.tar: stray file, no commit marker names it",
        "meta/shard-000001.parquet: stray file, no commit marker names it",
    ]


def rewrite_rows(root, change) -> None:
    """Rewrites shard-000000's Parquet rows and its marker to match (a writer bug, not a corruption)."""
    meta = root / ShardFiles("shard-000000").meta
    rows = pq.read_table(meta, schema=SCHEMA).to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), meta)
    path, marker = marker_of(root)
    marker["meta"].update(bytes=meta.stat().st_size, sha256=file_sha256(meta))
    path.write_text(json.dumps(marker))
    write_manifest(root, marker["fingerprint"])


def test_a_row_whose_byte_range_is_not_its_latent_is_named(out):
    def shift(rows):
        rows[0]["offset"] += 512

    rewrite_rows(out, shift)
    found = problems(out)
    assert any("row 'clip-000000' (clip 0): bytes" in p and "are not a latent member" in p for p in found), found
    assert any("has no row" in p for p in found), found


def test_a_row_whose_shape_differs_from_its_latent_is_named(out):
    def reshape(rows):
        rows[1]["latent_shape"] = [1, 2, 3, 4]

    rewrite_rows(out, reshape)
    (problem,) = problems(out)
    assert "row 'clip-000001' (clip 0): latent F32 [16, 8, 8, 8], the row says float32 [1, 2, 3, 4]" in problem


def test_counts_that_disagree_with_the_marker_or_the_manifest_and_other_settings_are_named(out):
    path, marker = marker_of(out)
    path.write_text(json.dumps({**marker, "ok": 2}))
    assert problems(out) == [
        "meta/shard-000000.parquet: 3 ok, its marker says 2",
        "manifest.json: its entry for shard-000000 differs from the marker in ok",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "frames": 1}))
    assert "manifest.json: frames = 1, its shards hold 48" in problems(out)
    path.write_text(json.dumps({**marker, "fingerprint": "0" * 16}))
    assert problems(out) == [
        "_commits/shard-000000.json: made with other settings (fingerprint 0000000000000000, the job's is "
        f"{manifest['fingerprint']})",
        "manifest.json: lists shard-000000, which is not committed",
        "manifest.json: frames = 1, its shards hold 48",
    ]


def test_the_command_exits_1_with_the_problems_and_2_for_a_directory_that_is_no_dataset(out, tmp_path):
    (out / ShardFiles("shard-000000").meta).write_bytes(b"not parquet")
    result = subprocess.run([sys.executable, "-m", "jobs.validate", str(out)], capture_output=True, text=True)
    assert result.returncode == 1 and "PROBLEM meta/shard-000000.parquet: " in result.stdout
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "jobs.validate", str(tmp_path / "empty")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "is not a latent dataset (no job.json)" in result.stderr
