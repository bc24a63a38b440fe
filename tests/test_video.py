from __future__ import annotations

import time

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.demo_data import synth_video, video_file_bytes
from jobs.inputs.video import VideoError, container_format, read_clip, resize_crop


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return synth_video(np.random.default_rng(0), width=96, height=64, num_frames=24, fps=24).frames


def test_reads_first_frames_resized_and_cropped(frames):
    data = video_file_bytes(frames, fps=24, crf=0)  # near-lossless, to compare pixel values
    clip = read_clip(data, num_frames=10, height=32, width=32)
    assert clip.pixels.shape == (3, 10, 32, 32)
    assert clip.pixels.dtype == torch.float32
    assert -1.0 <= clip.pixels.min() and clip.pixels.max() <= 1.0
    assert (clip.info.width, clip.info.height, clip.info.fps, clip.info.num_frames) == (96, 64, 24.0, 24)
    assert clip.info.codec == "h264" and clip.info.duration == pytest.approx(1.0, abs=0.05)
    # The same frames, resized by hand (cover 32x32 from 96x64 -> 48x32, crop 8 px each side).
    expected = F.interpolate(
        torch.from_numpy(frames[:10]).permute(0, 3, 1, 2).float() / 255, size=(32, 48), mode="bilinear"
    )
    expected = expected[..., :, 8:40].permute(1, 0, 2, 3) * 2 - 1
    assert (clip.pixels - expected).abs().mean() < 0.02  # only yuv420p chroma loss remains


def test_resize_crop_rounds_like_open_sora():
    x = torch.arange(2 * 3 * 5 * 9, dtype=torch.uint8).reshape(2, 3, 5, 9)
    # Width is the loose side: 5x9 covers 4x4 at scale 0.8 -> 4x7 (round(7.2)), crop columns 1..4.
    out = resize_crop(x, 4, 4)
    ref = F.interpolate(x.float() / 255, size=(4, 7), mode="bilinear", align_corners=False)[..., :, 1:5]
    assert out.shape == (2, 3, 4, 4) and torch.equal(out, ref)
    # Same size: untouched apart from the scaling to [0, 1].
    assert torch.equal(resize_crop(x, 5, 9), x.float() / 255)


def test_too_short_video(frames):
    with pytest.raises(VideoError, match="too short: 24 frames, need 30"):
        read_clip(video_file_bytes(frames, fps=24), num_frames=30, height=32, width=32)


def test_garbage_bytes():
    with pytest.raises(VideoError, match="cannot open video"):
        read_clip(b"\x00not a video" * 50, num_frames=4, height=32, width=32)


def test_truncated_mp4_is_reported(frames, tmp_path):
    path = tmp_path / "faststart.mp4"  # moov atom first: a cut file still opens
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = t
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    data = path.read_bytes()
    with pytest.raises(VideoError, match=r"damaged video: FFmpeg said '.+' \(h264\) while reading the container"):
        read_clip(data[: int(len(data) * 0.8)], num_frames=24, height=32, width=32)
    # Without faststart the index is at the end: a cut file does not even open.
    plain = video_file_bytes(frames, fps=24)
    with pytest.raises(VideoError, match="cannot open video"):
        read_clip(plain[: len(plain) // 2], num_frames=4, height=32, width=32)


def test_audio_only_file(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(VideoError, match=r"no video stream \(streams: audio\)"):
        read_clip(path.read_bytes(), num_frames=4, height=32, width=32)


def test_other_containers(frames):
    data = video_file_bytes(frames, fps=25, codec="mpeg4", container="avi")
    clip = read_clip(data, num_frames=5, height=48, width=48)
    assert clip.pixels.shape == (3, 5, 48, 48) and clip.info.codec == "mpeg4"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("concat script", b"ffconcat version 1.0\nfile secret.mp4\n"),  # would decode a local file
        ("SDP", b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5004 RTP/AVP 96\n"),
        ("HLS playlist", b"#EXTM3U\n#EXTINF:1,\nsecret.ts\n"),
        ("PNG", b"\x89PNG\r\n\x1a\n" + bytes(64)),
    ],
)
def test_only_allowed_containers_are_opened(tmp_path, monkeypatch, frames, name, data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.mp4").write_bytes(video_file_bytes(frames, fps=24))
    started = time.monotonic()
    with pytest.raises(VideoError, match=r"not a supported container \(mp4/mov/m4v, mkv/webm, avi, jpg, png, webp\)"):
        read_clip(data, num_frames=2, height=32, width=32)
    assert time.monotonic() - started < 1.0  # no socket was opened and waited on


def test_every_allowed_container_is_recognised_by_its_bytes(frames):
    assert container_format(video_file_bytes(frames, fps=24)) == "mov"
    assert container_format(video_file_bytes(frames, fps=24, codec="libvpx-vp9", container="webm")) == "matroska"
    assert container_format(video_file_bytes(frames, fps=25, codec="mpeg4", container="avi")) == "avi"


def test_frames_over_the_pixel_limit_and_slow_decodes_are_refused(frames):
    data = video_file_bytes(frames, fps=24)
    with pytest.raises(VideoError, match=r"frames of 96x64 are over limits.max_pixels = 6000"):
        read_clip(data, num_frames=4, height=32, width=32, max_pixels=6000)
    assert read_clip(data, num_frames=4, height=32, width=32, max_pixels=96 * 64).pixels.shape[1] == 4
    with pytest.raises(VideoError, match=r"decoding took over 1e-09 s \(1 frames; limits.decode_timeout_s\)"):
        read_clip(data, num_frames=20, height=32, width=32, timeout=1e-9)


DECODE_MANY = """
import sys
from jobs.demo_data import demo_sample
from jobs.inputs.sampling import ClipRequest
from jobs.inputs.video import DecodeLimits, read_clips
videos = [demo_sample(0, i)["mp4"] for i in range(32)]
for resize in ("exact", "decoder") * 6:
    for video in videos:
        read_clips(video, ClipRequest(8, 64, 64, resize=resize), limits=DecodeLimits(threads=2))
print("done")
"""


@pytest.mark.slow
def test_frame_threaded_decoding_never_hangs_when_a_clip_ends_early():
    """With FFmpeg's frame threads, freeing a codec whose threads still decode (a clip ends before
    the video does) while PyAV's log callback is in place hung within a few hundred clips: the
    free holds the GIL and joins a thread that waits for the GIL to log (PyAV-Org/PyAV#751)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", DECODE_MANY], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["done"], result.stderr[-2000:]
