"""A shard of everything people have, through the job's own encoder: buckets, several clips per
video, every kind of bad sample, with each row's bucket and frames worked out by hand.

The shard holds the media of `tests/fixtures/media/make_media.py` (H.264, HEVC, VP9, AV1, MPEG-4,
odd sizes, a rotated phone video, variable frame rate, three images) and the broken ones, plus a
3-frame video, a sample without a video, an unknown extension and a key seen twice.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from conftest import small_config
from fixtures.hostile.make_hostile import tar_bytes
from fixtures.media import make_media
from fixtures.media.make_media import Clip, write_clip
from safetensors.torch import load as load_safetensors

from jobs import reconstruct
from jobs.dataset.reader import read_metadata
from jobs.orchestration.driver import prepare_output, run
from jobs.orchestration.settings import check_config, make_plan
from jobs.orchestration.worker import ShardEncoder

BUCKETS = {"128px": {9: [1.0, 3], 5: [1.0, 4], 1: [1.0, 3]}}  # batch sizes unlike run.batch_size (2)
# 128px at multiple 16: 16:9 -> 96x176, 9:16 -> 176x96 (Open-Sora v2's table; test_sampling checks it).
# 160x96 (H/W 0.6) and 641x359 (0.56) are nearest 16:9 (0.5625); the phone video, shown 180x320, 9:16.
# uniform, at most 2 clips of 9 frames: 25 frames give 2 (starts linspace(0, 16, 2)), 12 frames one
# in the middle (start (12 - 9) // 2 = 1), the 39 grid frames of vfr.mkv 2 (starts 0, 30).
EXPECTED_OK = {
    ("h264", 0): ("128px/16:9/9", (96, 176), list(range(0, 9))),
    ("h264", 1): ("128px/16:9/9", (96, 176), list(range(16, 25))),
    ("hevc", 0): ("128px/16:9/9", (96, 176), list(range(1, 10))),
    ("vp9", 0): ("128px/16:9/9", (96, 176), list(range(1, 10))),
    ("av1", 0): ("128px/16:9/9", (96, 176), list(range(1, 10))),
    ("mpeg4", 0): ("128px/16:9/9", (96, 176), list(range(1, 10))),
    ("odd", 0): ("128px/16:9/5", (96, 176), list(range(0, 5))),  # 6 frames fill 5, not 9
    ("phone", 0): ("128px/9:16/9", (176, 96), list(range(1, 10))),
    ("vfr", 0): ("128px/16:9/9", (96, 176), list(range(0, 9))),
    ("vfr", 1): ("128px/16:9/9", (96, 176), list(range(30, 39))),
    ("jpg", 0): ("128px/16:9/1", (96, 176), [0]),
    ("png", 0): ("128px/16:9/1", (96, 176), [0]),
    ("webp", 0): ("128px/16:9/1", (96, 176), [0]),
}
EXPECTED_ERRORS = {
    "short": "fits no bucket: 160x96, 3 frames",  # a video never takes the 1-frame bucket
    "audio": "no video stream (streams: audio)",
    "empty": "no frames: the video stream is empty",
    "cut": "damaged video: FFmpeg said 'File ended prematurely'",
    "corrupt": "damaged video: FFmpeg said",
    "text-only": "no video member (looked for",
    "unknown": "no video member (looked for",
    "h264": "duplicate key (first at index 0 of this shard)",
}
FILES = {
    "h264": "h264.mp4",
    "hevc": "hevc.mkv",
    "vp9": "vp9.webm",
    "av1": "av1.mkv",
    "mpeg4": "mpeg4.avi",
    "odd": "h264-444-odd.mp4",
    "phone": "rotate-cw90.mp4",
    "vfr": "vfr.mkv",
    "jpg": "image.jpg",
    "png": "image.png",
    "webp": "image.webp",
    "audio": "audio-only.mp4",
    "empty": "zero-frames.mp4",
    "cut": "truncated.mkv",
    "corrupt": "corrupt-bitstream.mp4",
}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real-world")
    media = make_media.make_all(root / "media")
    short = write_clip(root / "media" / "short.mp4", Clip("libx264", frames=3))
    members = [(f"{key}.{name.rsplit('.', 1)[1]}", media[name].read_bytes()) for key, name in FILES.items()]
    members.insert(11, ("short.mp4", short.read_bytes()))
    members += [
        ("text-only.json", b'{"caption": "no video here"}'),
        ("unknown.xyz", b"\x00" * 64),
        ("h264.mp4", media["vp9.webm"].read_bytes()),  # the key again, not next to the first
    ]
    members.insert(1, ("h264.txt", b"a gray ramp"))
    path = root / "data" / "mixed.tar"
    path.parent.mkdir()
    path.write_bytes(tar_bytes(members))
    return path


def config_for(shard: Path, out: Path):
    return small_config([shard], out, video={"buckets": BUCKETS, "clips": "uniform", "max_clips": 2})


def test_every_row_has_its_bucket_frames_and_reason(shard, tmp_path):
    config = config_for(shard, tmp_path / "out")
    shards = check_config(config)
    plan = make_plan(config, shards, has_gpus=False)
    prepare_output(plan)
    encoder = ShardEncoder(plan.config, str(plan.root), plan.constants)
    calls: list[tuple[str, int]] = []
    run_model = encoder._run_model

    def spy(items):  # what each encoder call held: one bucket, at most its batch size
        assert len({item.clip.plan.bucket.name for item in items}) == 1
        calls.append((items[0].clip.plan.bucket.name, len(items)))
        return run_model(items)

    encoder._run_model = spy
    (done,) = [m for m in encoder.encode_shard(shards[0]) if hasattr(m, "marker")]
    rows = read_metadata(tmp_path / "out").to_pylist()

    ok = {(r["key"], r["clip"]): r for r in rows if r["status"] == "ok"}
    assert set(ok) == set(EXPECTED_OK)
    for (key, clip), (bucket, size, frames) in EXPECTED_OK.items():
        row = ok[key, clip]
        assert (row["bucket"], (row["height"], row["width"]), row["frame_indices"]) == (bucket, size, frames), key
        assert row["num_frames"] == len(frames) and row["latent_shape"][1] == len(frames)
        assert row["latent_shape"][2:] == [size[0] // 8, size[1] // 8]
    errors = {r["key"]: r["error"] for r in rows if r["status"] == "error"}
    assert set(errors) == set(EXPECTED_ERRORS)
    for key, reason in EXPECTED_ERRORS.items():
        assert errors[key].startswith(reason), (key, errors[key])
    assert ok["h264", 0]["caption"] == "a gray ramp" and ok["phone", 0]["src_rotation"] == -90
    assert ok["phone", 0]["src_width"] == 180 and ok["phone", 0]["src_height"] == 320
    assert ok["h264", 1]["clip_start"] == pytest.approx(16 / 25) and ok["vfr", 1]["frame_stride"] == 1
    assert done.marker["ok"] == len(EXPECTED_OK) and done.marker["errors"] == len(EXPECTED_ERRORS)

    # Batches of one bucket at its own batch size: 8 clips of 16:9/9 in calls of 3, 3, 2; 3 images in one.
    assert sorted(calls) == sorted(
        [("128px/16:9/9", 3), ("128px/16:9/9", 3), ("128px/16:9/9", 2)]
        + [("128px/16:9/5", 1), ("128px/9:16/9", 1), ("128px/16:9/1", 3)]
    )

    # The latent tar reads as webdataset samples, one per clip, each name unique.
    tar = tmp_path / "out" / ok["h264", 0]["shard"]
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == len(EXPECTED_OK) and "h264_c000" in keys and "h264_c001" in keys
    for sample in samples:
        sidecar = json.loads(sample["json"])
        latent = load_safetensors(sample["safetensors"])["latent"]
        row = ok[sidecar["key"], sidecar["clip"]]
        assert list(latent.shape) == row["latent_shape"] and sidecar["frame_indices"] == row["frame_indices"]
        with tarfile.open(tar) as t:  # the row's offset points at the same bytes
            f = t.extractfile(f"{sample['__key__']}.safetensors")
            assert f is not None and io.BytesIO(f.read()).getvalue() == sample["safetensors"]

    # Reconstruction re-reads each clip's own frames at its bucket's size (it refuses a shape mismatch).
    report_dir = tmp_path / "report"
    assert (
        reconstruct.main(["--latents", str(tmp_path / "out"), "--output", str(report_dir), "--keys", "h264,phone"]) == 0
    )
    report = json.loads((report_dir / "report.json").read_text())
    assert sorted((s["key"], s["height"], s["width"]) for s in report["samples"]) == [
        ("h264", 96, 176),
        ("h264", 96, 176),
        ("phone", 176, 96),
    ]
    assert len({s["video"] for s in report["samples"]}) == 3


@pytest.mark.slow
def test_the_job_on_ray_gives_the_same_rows_and_bytes(shard, tmp_path, ray_cluster):
    """The same shard through Ray twice: rows as above, and the files byte for byte the same."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        summary = run(config_for(shard, out))
        assert summary.complete and summary.errors == len(EXPECTED_ERRORS)
    rows = read_metadata(outs[0]).to_pylist()
    assert {(r["key"], r["clip"]) for r in rows if r["status"] == "ok"} == set(EXPECTED_OK)
    for rel in ("latents/mixed.tar", "meta/mixed.parquet"):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes()
