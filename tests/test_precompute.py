"""The precompute job end to end on a real local Ray cluster, real mp4s and real tar shards."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import webdataset as wds
from conftest import small_config
from safetensors.torch import load as load_safetensors

from jobs.dataset.layout import SCHEMA
from jobs.dataset.reader import load_sample, read_metadata
from jobs.demo_data import demo_sample, synth_video, video_file_bytes, write_shard
from jobs.inputs.tar_samples import read_shard
from jobs.inputs.video import read_clip
from jobs.orchestration.config import RunFailed, TilingSection, UsageError, apply_override
from jobs.orchestration.driver import prepare_output, run
from jobs.orchestration.pool import EncoderPool
from jobs.orchestration.settings import check_config, make_plan
from jobs.orchestration.worker import reason_kind, sample_seed
from jobs.precompute import main
from jobs.status import status
from vae import encode_video, get_preset, load_vae, plan_encode

REPO = Path(__file__).resolve().parents[1]


def _digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for sub in ("latents", "meta")
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def clean_run(ray_cluster, demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "latents"
    summary = run(small_config(demo_shards, out))
    return out, summary


def test_every_sample_is_encoded(clean_run, demo_shards):
    out, summary = clean_run
    assert summary.complete and summary.ok == 12 and summary.errors == 0 and summary.frames == 12 * 8
    assert summary.shards_written == 3 and summary.shards_skipped == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    assert files == sorted(
        ["job.json", "manifest.json", "report.json"]
        + [f"{d}/shard-00000{i}.{ext}" for i in range(3) for d, ext in [("latents", "tar"), ("meta", "parquet")]]
        + [f"_commits/shard-00000{i}.json" for i in range(3)]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ok"] == 12 and len(manifest["shards"]) == 3
    job = json.loads((out / "job.json").read_text())
    assert job["fingerprint"] == summary.fingerprint and job["settings"]["vae"]["name"] == "flux-ae-tiny"
    assert job["config"]["video"]["num_frames"] == 8


def test_output_is_readable_by_duckdb_pyarrow_and_webdataset(clean_run):
    out, _ = clean_run
    rows = duckdb.sql(f"SELECT * FROM '{out}/**/*.parquet' ORDER BY source, index").fetchall()
    assert len(rows) == 12
    files = sorted(str(p) for p in out.glob("**/*.parquet"))
    table = pads.dataset(files, format="parquet").to_table()  # no schema given: the files agree
    assert table.num_rows == 12 and table.schema.equals(SCHEMA)
    assert pads.dataset(out / "meta", format="parquet").count_rows() == 12
    row = table.to_pylist()[0]
    assert row["status"] == "ok" and row["error"] is None
    assert row["latent_shape"] == [16, 8, 8, 8] and row["latent_dtype"] == "float32"
    assert (row["num_frames"], row["height"], row["width"]) == (8, 64, 64)
    assert row["fps"] in (24.0, 25.0, 30.0) and row["caption"].endswith("moving over a soft gradient")
    assert row["vae"] == "flux-ae-tiny" and row["vae_checkpoint_sha256"] == "random-init-seed-0"
    assert row["scale_factor"] == pytest.approx(0.3611) and row["shift_factor"] == pytest.approx(0.1159)
    keys = [s["__key__"] for s in wds.WebDataset(str(out / row["shard"]), shardshuffle=False)]
    assert keys == [f"clip-{i:06d}" for i in range(4)]


def test_latents_are_what_the_vae_gives(clean_run, demo_shards):
    """Decode, encode with the same model and per-sample seed by hand: same numbers."""
    out, _ = clean_run
    rows = {r["key"]: r for r in read_metadata(out).to_pylist()}
    model = load_vae("flux-ae-tiny")
    for sample in list(read_shard(str(demo_shards[1]), print))[:2]:
        clip = read_clip(sample.files["mp4"], 8, 64, 64)
        gen = torch.Generator().manual_seed(sample_seed(0, sample.key))
        with torch.inference_mode():
            expected, _ = model.encode(clip.pixels[None], sample=True, generator=[gen])
        stored = load_sample(out, rows[sample.key])["latent"]
        torch.testing.assert_close(stored, expected[0], atol=1e-5, rtol=1e-5)


def test_rerun_skips_everything_and_changes_nothing(clean_run, demo_shards):
    out, summary = clean_run
    before = _digests(out)
    again = run(small_config(demo_shards, out))
    assert again.shards_skipped == 3 and again.shards_written == 0 and again.ok == 0
    assert again.fingerprint == summary.fingerprint
    assert _digests(out) == before


def test_other_settings_are_refused_not_mixed(clean_run, demo_shards):
    out, _ = clean_run
    with pytest.raises(UsageError, match=r"other settings \(video.num_frames: 8 -> 16\)"):
        run(small_config(demo_shards, out, video={"num_frames": 16}))


def test_resume_redoes_only_uncommitted_shards(clean_run, demo_shards, tmp_path):
    out, _ = clean_run
    before = _digests(out)
    # Simulate a crash while shard 1 was being written: no marker, a temporary left behind.
    (out / "_commits" / "shard-000001.json").unlink()
    (out / "meta" / "shard-000001.parquet").unlink()
    (out / "latents" / ".shard-000001.tar.0123456789ab.tmp").write_bytes(b"partial")
    summary = run(small_config(demo_shards, out))
    assert summary.shards_written == 1 and summary.shards_skipped == 2 and summary.ok == 4
    assert _digests(out) == before  # identical bytes, temporaries gone


@pytest.mark.parametrize("damage", ["marker of other settings", "same-size corruption"])
def test_a_shard_not_committed_by_these_settings_is_redone(clean_run, demo_shards, damage):
    out, _ = clean_run
    before = _digests(out)
    if damage == "marker of other settings":
        path = out / "_commits" / "shard-000002.json"
        marker = json.loads(path.read_text())
        path.write_text(json.dumps({**marker, "fingerprint": "0" * 16}))
    else:
        tar = out / "latents" / "shard-000002.tar"
        data = bytearray(tar.read_bytes())
        data[2000] ^= 0xFF
        tar.write_bytes(bytes(data))
    summary = run(small_config(demo_shards, out))
    assert summary.shards_written == 1 and summary.shards_skipped == 2 and summary.ok == 4
    assert _digests(out) == before


def test_a_shard_committed_from_another_input_of_its_name_is_refused_or_kept_as_moved(
    ray_cluster, demo_shards, tmp_path
):
    """A rerun whose input has a committed shard's name but another source (other data under the
    same name, or the same data moved): refused before anything changes; `run.inputs_moved` keeps
    what is committed. (Encoding it again would first withdraw the committed shard's marker, and a
    failed attempt would then leave neither.)"""
    out = tmp_path / "o"
    run(small_config(demo_shards[:1], out))
    before, job = _digests(out), (out / "job.json").read_bytes()
    moved = tmp_path / "elsewhere" / demo_shards[0].name
    moved.parent.mkdir()
    shutil.copy(demo_shards[0], moved)
    name = demo_shards[0].stem
    expected = f"1 shards of this run are committed in {out} from other inputs under the same names: {name} from "
    with pytest.raises(UsageError, match=re.escape(f"{expected}{demo_shards[0]}, which this run reads from {moved}.")):
        run(small_config([moved], out))
    assert _digests(out) == before and (out / "job.json").read_bytes() == job
    assert (out / "_commits" / f"{name}.json").is_file()
    summary = run(small_config([moved], out, run={"inputs_moved": True}))
    assert summary.shards_skipped == 1 and summary.shards_written == 0 and _digests(out) == before
    state = status(out)  # the shard kept stays recorded by its first source: the job is finished
    assert state["finished"] and state["pending"] == [] and state["inputs"] == 1


def test_a_marker_that_cannot_be_read_ends_the_run_and_is_kept(ray_cluster, demo_shards, tmp_path):
    """An I/O error reading a marker (here a link that loops; an EIO, an object store's 503) says
    nothing about the commit: the run ends with it instead of withdrawing the marker."""
    out = tmp_path / "o"
    run(small_config(demo_shards[:1], out))
    before = _digests(out)
    marker = out / "_commits" / f"{demo_shards[0].stem}.json"
    marker.unlink()
    marker.symlink_to(marker)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        run(small_config(demo_shards[:1], out))
    assert marker.is_symlink() and _digests(out) == before


def test_a_withdrawn_marker_takes_the_manifest_with_it(ray_cluster, demo_shards, tmp_path):
    """The manifest lists every committed shard: once a shard's marker is withdrawn (its files no
    longer match it), the manifest would name a shard that is not there, so it goes too, until the
    run completes again."""
    out = tmp_path / "o"
    config = small_config(demo_shards[:1], out)
    run(config)
    assert (out / "manifest.json").is_file()
    tar = out / "latents" / f"{demo_shards[0].stem}.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size: only the checksum tells
    tar.write_bytes(bytes(data))
    pending = prepare_output(make_plan(config, check_config(config), has_gpus=False))
    assert [s.name for s in pending] == [demo_shards[0].stem]
    assert not (out / "manifest.json").exists() and not (out / "_commits" / f"{demo_shards[0].stem}.json").exists()


def test_leftovers_of_an_interrupted_run_are_removed_before_it_goes_on(demo_shards, tmp_path):
    config = small_config(demo_shards[:1], tmp_path / "o")
    plan = make_plan(config, check_config(config), has_gpus=False)
    prepare_output(plan)
    leftovers = [
        tmp_path / "o" / "latents" / ".shard-000000.tar.0123456789ab.tmp",
        tmp_path / "o" / "meta" / "a" / ".shard-000007.parquet.0123456789ab.tmp",
        tmp_path / "o" / ".job.json.0123456789ab.tmp",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    prepare_output(plan)  # the start of a run, before any shard is handed out
    assert not [p for p in leftovers if p.exists()]


FINGERPRINTED = [
    "vae.name=dc-ae-tiny",
    "vae.checkpoint=configs/demo-vae.safetensors",
    "vae.dtype=bfloat16",
    "vae.sample=false",
    "vae.seed=1",
    "vae.tiling.mode=off",
    "vae.tiling.memory_budget_gb=1",
    "vae.tiling.causal_norm=chunk",
    "video.num_frames=4",
    "video.height=96",
    "video.width=96",
    "video.adapt=true",
    "video.extensions=[mp4]",
    "video.fps_max=12",
    "video.resize=decoder",
    "video.clips=middle",
    "video.max_clips=2",
    "video.clip_every_s=2",
    "video.buckets={128px: {9: [1.0, 2]}}",
    "video.bucket_multiple=32",
    "latents.dtype=bfloat16",
    "latents.store_posterior=true",
    "run.batch_size=3",
    "run.cpus_per_worker=2",
    "run.channels_last=true",
    "run.compile=true",
]
NOT_FINGERPRINTED = [
    "run.workers=2",
    "run.max_attempts=1",
    "run.decode_threads=1",
    "run.address=127.0.0.1:6379",
    "run.gpus=4",
    "run.pin_memory=false",
    "run.write_behind=false",
    "run.uint8_frames=false",
    "run.reuse_host_memory=false",
    "run.progress_interval_s=2",
    "limits.max_frames=1000",
    "limits.max_pixels=1000000",
]


def _fingerprint(demo_shards, tmp_path, override: str | None) -> str:
    config = small_config(demo_shards[:1], tmp_path / "o")
    if override:
        apply_override(config, override.replace("configs/", f"{REPO}/configs/"))
    return make_plan(config, check_config(config), has_gpus=False).fingerprint


@pytest.mark.parametrize("override", FINGERPRINTED)
def test_every_setting_that_changes_the_bytes_changes_the_fingerprint(demo_shards, tmp_path, override):
    """The settings the job itself builds are hashed, not a hand-made dict."""
    assert _fingerprint(demo_shards, tmp_path, override) != _fingerprint(demo_shards, tmp_path, None)


@pytest.mark.parametrize("override", NOT_FINGERPRINTED)
def test_settings_that_leave_the_bytes_alone_keep_the_fingerprint(demo_shards, tmp_path, override):
    assert _fingerprint(demo_shards, tmp_path, override) == _fingerprint(demo_shards, tmp_path, None)


def test_broken_samples_become_error_rows(ray_cluster, tmp_path):
    good = demo_sample(seed=0, index=0)
    frames = synth_video(np.random.default_rng(1), 64, 64, 5, 24).frames
    samples = [
        ("ok-1", good),
        ("garbage", {"mp4": b"\x00\x01 not a video" * 64, "txt": b"noise"}),
        ("no-video", {"json": b'{"caption": "orphan"}'}),
        ("short", {"mp4": video_file_bytes(frames, 24), "txt": b"five frames"}),
        ("cut", {"mp4": good["mp4"][: len(good["mp4"]) // 2], "txt": b"truncated"}),
        ("ok-2", demo_sample(seed=0, index=1)),
        ("ok-1", good),  # the same key again, not adjacent
    ]
    write_shard(tmp_path / "bad" / "shard-0.tar", samples)
    write_shard(tmp_path / "bad" / "shard-1.tar", [(f"t{i}", demo_sample(0, i)) for i in range(3)])
    whole = (tmp_path / "bad" / "shard-1.tar").read_bytes()
    (tmp_path / "bad" / "shard-1.tar").write_bytes(whole[: len(whole) // 2])  # a truncated shard

    out = tmp_path / "out"
    summary = run(small_config([tmp_path / "bad" / "shard-{0..1}.tar"], out))
    assert summary.complete  # error rows are not job failures
    rows = read_metadata(out).to_pylist()
    by = {(r["source"].rsplit("/", 1)[-1], r["index"]): r for r in rows}
    status = {k: (r["key"], r["status"]) for k, r in by.items() if k[0] == "shard-0.tar"}
    assert status == {
        ("shard-0.tar", 0): ("ok-1", "ok"),
        ("shard-0.tar", 1): ("garbage", "error"),
        ("shard-0.tar", 2): ("no-video", "error"),
        ("shard-0.tar", 3): ("short", "error"),
        ("shard-0.tar", 4): ("cut", "error"),
        ("shard-0.tar", 5): ("ok-2", "ok"),
        ("shard-0.tar", 6): ("ok-1", "error"),
    }
    reasons = {by[("shard-0.tar", i)]["error"] for i in (1, 2, 3, 4, 6)}
    assert any(r.startswith("cannot open video") for r in reasons)
    assert any(r.startswith("no video member") for r in reasons)
    assert "too short: 5 frames, need 8" in reasons
    assert "duplicate key (first at index 0 of this shard)" in reasons
    assert by[("shard-0.tar", 2)]["caption"] == "orphan"
    shard1 = [r for r in rows if r["source"].endswith("shard-1.tar")]
    assert [r["status"] for r in shard1 if r["index"] >= 0][:1] == ["ok"]
    assert any(r["key"] == "__shard__" and "tar read error" in r["error"] for r in shard1)
    assert summary.ok == sum(r["status"] == "ok" for r in rows) and summary.errors == len(rows) - summary.ok


def test_bf16_storage_with_posterior(ray_cluster, demo_shards, tmp_path):
    config = small_config(demo_shards[:1], tmp_path / "out", latents={"dtype": "bfloat16", "store_posterior": True})
    summary = run(config)
    assert summary.ok == 4
    row = read_metadata(tmp_path / "out").to_pylist()[0]
    tensors = load_sample(tmp_path / "out", row)
    assert sorted(tensors) == ["latent", "logvar", "mean"]
    assert all(t.dtype == torch.bfloat16 and t.shape == (16, 8, 8, 8) for t in tensors.values())
    assert row["latent_dtype"] == "bfloat16"
    with open(tmp_path / "out" / row["shard"], "rb") as f:  # the byte range alone is a safetensors file
        f.seek(row["offset"])
        assert torch.equal(load_safetensors(f.read(row["size"]))["latent"], tensors["latent"])


def test_main_prints_progress_and_summary(ray_cluster, demo_shards, tmp_path, capsys):
    code = main(
        ["--input", str(demo_shards[0]), "--output", str(tmp_path / "o"), "--set", "video.num_frames=4"]
        + ["--set", "video.height=32", "--set", "video.width=32", "--workers", "1"]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "4/4 samples 100.0%" in captured.err and "samples/s" in captured.err and "ETA" in captured.err
    assert "4 ok, 0 errors, 16 frames encoded" in captured.out
    assert f"output: {tmp_path / 'o'}" in captured.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: no input given (--input SPEC)"),
        (["--input", "{tmp}/nope-{{0..1}}.tar", "--output", "{tmp}/o"], "error: input shard not found: "),
        (["--input", "{shard}", "--output", "{tmp}/o", "--vae", "sdxl"], "error: unknown VAE 'sdxl'; known: "),
        (["--input", "{shard}", "--output", "{tmp}/o", "--set", "video.height=100"], "height 100 (must be a positive"),
        (["--input", "{shard}", "--output", "{tmp}/o", "--checkpoint", "{tmp}/w.pt"], "error: checkpoint not found"),
        (
            ["--input", "{shard}", "--output", "{tmp}/o", "--set", "video.fps=3"],
            "error: unknown config key 'video.fps'",
        ),
    ],
)
def test_unusable_arguments_exit_2_with_one_line(args, message, demo_shards, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, shard=demo_shards[0]) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_frame_and_size_rules_refuse_or_adapt(ray_cluster, demo_shards, tmp_path, capsys):
    base = ["--input", str(demo_shards[0]), "--output", str(tmp_path / "o"), "--vae", "hunyuan-vae-tiny"]
    size = ["--set", "video.height=36", "--set", "video.width=44"]
    assert main(base + ["--set", "video.num_frames=8"] + size) == 2
    err = capsys.readouterr().err
    assert "VAE 'hunyuan-vae-tiny' cannot encode 8 frames (the rule is T = 1+4k; e.g. 5 or 9)" in err
    assert "height 36 (must be a positive multiple of 8)" in err and "--set video.adapt=true" in err
    assert main(base + ["--set", "video.num_frames=8", "--set", "video.adapt=true"] + size) == 0
    assert "video.adapt: 8 frames 36x44 -> 5 frames 32x40" in capsys.readouterr().err
    row = read_metadata(tmp_path / "o").to_pylist()[0]
    assert (row["num_frames"], row["height"], row["width"]) == (5, 32, 40)
    assert row["latent_shape"] == [16, 2, 4, 5] and row["vae"] == "hunyuan-vae-tiny"


def test_memory_budget_tiles_the_encode_and_records_it(ray_cluster, demo_shards, tmp_path):
    """A causal-VAE job under a tiny memory budget: chunked/tiled encode, recorded per row."""
    tiling = {"mode": "auto", "memory_budget_gb": 0.03}
    config = small_config(
        demo_shards[:1], tmp_path / "o", vae={"name": "hunyuan-vae-tiny", "tiling": TilingSection(**tiling)}
    )
    config.video.num_frames = 9
    summary = run(config)
    assert summary.ok == 4
    rows = read_metadata(tmp_path / "o").to_pylist()
    plan = plan_encode(get_preset("hunyuan-vae-tiny"), (2, 3, 9, 64, 64), torch.float32, config.tiling())
    assert not plan.untiled and {r["tiling"] for r in rows} == {plan.describe()}
    model = load_vae("hunyuan-vae-tiny")
    sample = next(read_shard(str(demo_shards[0]), print))
    clip = read_clip(sample.files["mp4"], 9, 64, 64).pixels[None]
    gen = [torch.Generator().manual_seed(sample_seed(0, sample.key))]
    with torch.inference_mode():
        expected, _ = encode_video(model, get_preset("hunyuan-vae-tiny"), clip, generator=gen, tiling=plan)
    stored = load_sample(tmp_path / "o", rows[0])["latent"]
    torch.testing.assert_close(stored, expected[0], atol=1e-5, rtol=1e-5)
    job = json.loads((tmp_path / "o" / "job.json").read_text())
    assert job["settings"]["tiling"] == {"mode": "auto", "memory_budget_gb": 0.03, "causal_norm": "causal"}


def test_cli_entrypoint_exit_status_and_list_vaes():
    listing = subprocess.run([sys.executable, "-m", "jobs.precompute", "--list-vaes"], capture_output=True, text=True)
    assert listing.returncode == 0
    assert (
        "flux-ae " in listing.stdout
        and "1x8x8" in listing.stdout
        and "scale_factor * (z - shift_factor)" in listing.stdout
    )
    bad = subprocess.run([sys.executable, "-m", "jobs.precompute", "--output", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: no input given (--input SPEC)"


def test_a_failure_that_is_not_about_the_arguments_keeps_its_traceback(ray_cluster, demo_shards, tmp_path, capsys):
    """Only usage and checkpoint errors become "error: ..." and exit 2; an OSError of the run propagates."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError):
        main(["--input", str(demo_shards[0]), "--output", str(blocker / "out")])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.slow
def test_cli_exits_1_with_the_traceback_of_an_unexpected_failure(demo_shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["--input", str(demo_shards[0]), "--output", str(blocker / "out")]
    done = subprocess.run(
        [sys.executable, "-m", "jobs.precompute", *argv], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "NotADirectoryError" in done.stderr
    assert "\nerror: " not in done.stderr


def test_a_shard_that_cannot_be_read_fails_and_is_never_committed(ray_cluster, demo_shards, tmp_path, capsys):
    """A failing `pipe:` command: retried, then a failed shard and exit 1; no marker, no files."""
    good, missing = demo_shards[0], tmp_path / "gone.tar"
    out = tmp_path / "out"
    argv = ["--output", str(out), "--set", "video.num_frames=8", "--set", "video.height=64"]
    argv += ["--set", "video.width=64", "--set", "run.max_attempts=2", "--allow-pipe"]  # --allow-shell's alias
    assert main([*argv, "--input", f"pipe:cat {missing}", "--input", str(good)]) == 1
    printed = capsys.readouterr().out
    failed = next(line for line in printed.splitlines() if "FAILED shard gone" in line)
    assert "2 attempts, last: ShardReadError: reading" in failed and "exit 1" in failed, failed
    assert sorted(p.name for p in (out / "_commits").glob("*.json")) == [f"{good.stem}.json"]
    assert not (out / "latents" / "gone.tar").exists() and not (out / "manifest.json").exists()
    missing.write_bytes(good.read_bytes())  # the source is back: a rerun does the failed shard only
    assert main([*argv, "--input", f"pipe:cat {missing}", "--input", str(good)]) == 0
    assert "1 written, 1 already committed" in capsys.readouterr().out


def test_pipe_inputs_need_the_users_opt_in(demo_shards, tmp_path, capsys):
    ran = tmp_path / "ran"
    assert main(["--input", f"pipe:touch {ran}; cat {demo_shards[0]}", "--output", str(tmp_path / "o")]) == 2
    assert "is a shell command (pipe:)" in capsys.readouterr().err and not ran.exists()


def test_a_rerun_with_other_inputs_adds_to_the_manifest_and_job_file(ray_cluster, demo_shards, tmp_path):
    out = tmp_path / "out"
    run(small_config(demo_shards[:1], out))
    run(small_config(demo_shards[1:2], out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [demo_shards[0].stem, demo_shards[1].stem]
    assert manifest["samples"] == 8
    assert json.loads((out / "job.json").read_text())["inputs"] == [str(demo_shards[0]), str(demo_shards[1])]


def test_adding_shards_and_rerunning_encodes_only_the_new_ones(ray_cluster, demo_shards, tmp_path):
    out = tmp_path / "out"
    run(small_config(demo_shards[:2], out))
    before = {p: p.stat().st_mtime_ns for p in (out / "latents").glob("*.tar")}
    summary = run(small_config(demo_shards, out))  # one shard more
    assert (summary.shards_skipped, summary.shards_written, summary.ok) == (2, 1, 4)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the committed ones untouched
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [s.stem for s in demo_shards] and manifest["samples"] == 12


def test_a_manifest_that_cannot_be_written_fails_the_run_and_leaves_no_temporary(ray_cluster, demo_shards, tmp_path):
    out = tmp_path / "out"
    argv = ["--input", str(demo_shards[0]), "--output", str(out), "--set", "video.num_frames=8"]
    assert main(argv) == 0
    (out / "manifest.json").unlink()
    (out / "manifest.json" / "blocker").mkdir(parents=True)  # where the manifest must go
    with pytest.raises(OSError):  # not a usage error: main lets it out with its traceback (exit 1)
        main(argv)
    assert not [p for p in out.rglob("*.tmp")]
    assert (out / "_commits" / f"{demo_shards[0].stem}.json").is_file()  # what was done is kept


def test_more_workers_than_the_cluster_places_start_what_fits(ray_cluster, demo_shards, tmp_path, capsys):
    summary = run(small_config(demo_shards[:2], tmp_path / "o", run={"workers": 4}))  # the cluster has 2 CPUs
    assert summary.complete and summary.shards_written == 2
    assert (
        "4 workers asked for, but the cluster (2 CPUs on 1 node) places 2 of 1 CPUs on one node each"
        in capsys.readouterr().err
    )


def test_no_placeable_worker_or_a_bad_seed_is_one_line(ray_cluster, demo_shards, tmp_path, capsys):
    argv = ["--input", str(demo_shards[0]), "--output", str(tmp_path / "o"), "--set", "video.num_frames=8"]
    assert main([*argv, "--set", "run.cpus_per_worker=64"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1]
        == "error: no encoder actor can be placed: each needs 64 CPUs on one node, the cluster has 2 CPUs on 1 node "
        "(run.cpus_per_worker)"
    )
    assert main([*argv, "--set", "vae.seed=18446744073709551616"]) == 2
    assert capsys.readouterr().err.strip() == "error: vae.seed must be in [0, 2**63); got 18446744073709551616"


def test_an_actor_that_fails_to_start_is_a_one_line_reason(ray_cluster, demo_shards, tmp_path, capsys):
    config = small_config(demo_shards[:1], tmp_path / "o")
    plan = make_plan(config, check_config(config), has_gpus=False)
    plan.config.vae.seed = 2**64  # past the check: the real constructor fails (torch cannot seed with it)
    with pytest.raises(RunFailed, match=r"^no encoder actor could start: .*(Overflow|RuntimeError)"):
        EncoderPool(plan, 1, 0)
    # A constructor that raised would raise again: not started anew (as an actor killed while it starts is)
    assert "starting another" not in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_an_actor_never_placed_is_given_up_at_its_deadline(ray_cluster, demo_shards, tmp_path):
    """An actor the cluster cannot place (past the check: more CPUs than it has) is dropped once
    `run.actor_start_timeout` is up, instead of keeping the job waiting forever."""
    config = small_config(demo_shards[:1], tmp_path / "o", run={"actor_start_timeout": 1.0})
    plan = make_plan(config, check_config(config), has_gpus=False)
    plan.config.run.cpus_per_worker = 64
    started = time.monotonic()
    with pytest.raises(
        RunFailed, match=r"^no encoder actor could start: not started within run.actor_start_timeout = 1 s$"
    ):
        EncoderPool(plan, 1, 0)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("limit", "reason"),
    [
        ("limits.max_pixels=1000", "over limits.max_pixels = 1000"),
        ("limits.max_member_bytes=5000", "over the limit"),
        ("limits.decode_timeout_s=1e-9", "decoding took over 1e-09 s"),
    ],
)
def test_samples_over_a_limit_are_error_rows_naming_it(ray_cluster, demo_shards, tmp_path, limit, reason):
    config = small_config(demo_shards[:1], tmp_path / "o")
    apply_override(config, limit)
    summary = run(config)
    rows = read_metadata(tmp_path / "o").to_pylist()
    assert summary.complete and len(rows) == 4 and all(r["status"] == "error" and reason in r["error"] for r in rows)
    # The report and the summary count error rows by reason (numbers elided, so alike errors add up).
    kinds = Counter(reason_kind(r["error"]) for r in rows)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["errors"] == 4 and report["error_reasons"] == [{"reason": k, "count": n} for k, n in kinds.items()]
    assert f"errors by reason: {'; '.join(f'{k} ({n})' for k, n in kinds.items())}" in summary.text()


def test_the_error_budget_stops_the_job_and_a_rerun_goes_on(ray_cluster, demo_shards, tmp_path, capsys):
    """Every sample too short: past `run.error_rate_after` samples the job stops, what is committed stays."""
    out = tmp_path / "out"
    argv = ["--input", str(demo_shards[0].parent / "shard-*.tar"), "--output", str(out)]
    argv += ["--set", "video.num_frames=200", "--set", "run.error_rate_after=4", "--max-error-rate", "0.5"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    stopped = next(line for line in printed.splitlines() if "STOPPED:" in line)
    assert "samples (100%) are error rows, more than run.max_error_rate = 0.5" in stopped
    assert "most common: too short: N frames, need N" in stopped
    committed = len(list((out / "_commits").glob("*.json")))
    assert 1 <= committed < 3 and not (out / "manifest.json").exists()
    assert main([*argv[:-2], "--max-error-rate", "1"]) == 0  # the rest, once the budget allows it
    assert f"{committed} already committed" in capsys.readouterr().out
