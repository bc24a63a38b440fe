"""Real files of every kind people have (tests/fixtures/media/make_media.py), decoded frame by frame.

Frame i of every fixture is a gray of level 16 + 8 i, so each decoded frame says which source
frame it is: the tests check the exact frames each clip holds, after seeking, sampling by fps,
sampling by timestamps and turning by the display matrix.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch
from fixtures.media import make_media
from fixtures.media.make_media import VFR_TIMES_MS, frame_index

from jobs.inputs.decode_pool import ClipSpec, DecodePool
from jobs.inputs.sampling import ClipRequest
from jobs.inputs.video import DecodeLimits, VideoError, VideoFile, image_size, read_clips

VIDEOS = [name for name in make_media.CLIPS if not name.startswith(("vfr", "rotate"))]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return {name: path.read_bytes() for name, path in make_media.make_all(tmp_path_factory.mktemp("media")).items()}


def identities(pixels: torch.Tensor) -> list[int]:
    """The source frame each frame of a `C T H W` clip in [-1, 1] shows."""
    gray = ((pixels + 1) * 127.5).round().mean(0)  # T H W
    return [frame_index(gray[t].numpy()) for t in range(gray.shape[0])]


@pytest.mark.parametrize("name", VIDEOS)
def test_every_codec_and_container_gives_the_frames_asked_for(media, name):
    clip = make_media.CLIPS[name]
    request = ClipRequest(num_frames=4, height=48, width=48, policy="middle")
    (decoded,) = read_clips(media[name], request)
    start = (clip.frames - 4) // 2  # after a seek into the video
    assert identities(decoded.pixels) == list(range(start, start + 4))
    width, height = clip.size
    assert (decoded.info.width, decoded.info.height, decoded.info.num_frames) == (width, height, clip.frames)


def test_frames_an_edit_list_hides_are_neither_counted_nor_shown(media):
    """An mp4 cut without re-encoding (`h264-cut.mp4`): the frames before its edit list's start are
    decoded for reference but never shown, by FFmpeg or by Open-Sora's reader; a clip from the
    start begins with the first frame shown, not with it repeated over the hidden ones' times."""
    data, shown = media["h264-cut.mp4"], 25 - make_media.CUT_FRAMES
    info = VideoFile(data).info
    assert (info.num_frames, info.packets, info.claimed_frames) == (shown, shown, 25)
    for policy, start in [("first", 0), ("middle", (shown - 4) // 2)]:
        (clip,) = read_clips(data, ClipRequest(num_frames=4, height=48, width=48, policy=policy))
        first = make_media.CUT_FRAMES + start
        assert identities(clip.pixels) == list(range(first, first + 4)), policy


def test_timestamps_rounded_to_a_coarse_time_base_keep_every_frame(media):
    """240 fps in Matroska's milliseconds: frames stored up to 0.12 of a frame late are each still
    the frame on display at their grid time (at a tenth of a frame's slack, frames 3, 9, 15 and 21
    each gave way to the one before)."""
    (clip,) = read_clips(media["h264-240fps.mkv"], ClipRequest(num_frames=24, height=48, width=48))
    assert clip.info.fps == make_media.HIGH_RATE and identities(clip.pixels) == list(range(24))


def test_timestamps_out_of_order_give_the_frames_in_the_decoders_order(media):
    """H.264 with B-frames in AVI: the made-up timestamps come out of order (taken as they were,
    every other frame was doubled and the one between lost); the frames are then taken in the
    order the decoder gives them, as Open-Sora's reader takes them."""
    data = media["h264-bframes.avi"]
    for policy, start in [("first", 0), ("middle", 10)]:
        (clip,) = read_clips(data, ClipRequest(num_frames=5, height=48, width=48, policy=policy))
        assert identities(clip.pixels) == list(range(start, start + 5)), policy


def test_only_the_clip_is_decoded_from_the_keyframe_before_it(tmp_path):
    path = make_media.write_clip(tmp_path / "gop5.mp4", make_media.Clip("libx264", frames=25, options={"g": "5"}))
    video = VideoFile(path.read_bytes())
    request = ClipRequest(num_frames=3, height=32, width=32, policy="middle")  # frames 11, 12, 13
    (plan,) = video.clips(request)
    assert identities(video.decode(plan)) == [11, 12, 13]
    # From the keyframe at 10 to frame 13, and the next one that ends 13's time on display.
    assert video.frames_decoded == 5


SHORT_GOPS = {
    "h264-open-gop.mp4": make_media.Clip(
        "libx264", frames=30, options={"g": "6", "x264-params": "open-gop=1:bframes=3"}
    ),
    "hevc-open-gop.mkv": make_media.Clip(
        "libx265", frames=30, options={"x265-params": "log-level=error:keyint=6:min-keyint=6:open-gop=1:bframes=3"}
    ),
    "vp9-gop6.webm": make_media.Clip("libvpx-vp9", frames=30, options={"g": "6"}),
    "av1-gop8.mkv": make_media.Clip("libsvtav1", frames=30, options={"g": "8"}),
}


@pytest.mark.parametrize("name", SHORT_GOPS)
def test_clips_after_seeking_into_short_and_open_gops(tmp_path, name):
    path = make_media.write_clip(tmp_path / name, SHORT_GOPS[name])
    request = ClipRequest(num_frames=5, height=32, width=32, policy="uniform", max_clips=4)
    clips = read_clips(path.read_bytes(), request)  # starts linspace(0, 25, 4) = 0, 8, 16, 25
    assert [identities(c.pixels) for c in clips] == [list(range(s, s + 5)) for s in (0, 8, 16, 25)]


def test_several_clips_and_a_target_fps(media):
    # 25 frames at 25 fps, at most 12 fps: interval ceil(25 / 12) = 3; 4 frames in a window of 12,
    # linspace(s, s + 11, 4) truncated; uniform: min(8, 25 // 12) = 2 clips at linspace(0, 13, 2).
    request = ClipRequest(num_frames=4, height=32, width=32, fps_max=12, policy="uniform")
    clips = read_clips(media["h264.mp4"], request, "k")
    assert [c.plan.frames for c in clips] == [(0, 3, 7, 11), (13, 16, 20, 24)]
    assert [identities(c.pixels) for c in clips] == [[0, 3, 7, 11], [13, 16, 20, 24]]
    assert all(c.plan.stride == 3 for c in clips)


@pytest.mark.parametrize(("name", "rotation"), [("rotate-cw90.mp4", -90), ("rotate-ccw90.mp4", 90)])
def test_the_display_rotation_is_applied(media, name, rotation):
    # Stored 320x180 with the marker top-left; shown 180x320 (a phone's portrait video).
    (clip,) = read_clips(media[name], ClipRequest(num_frames=2, height=320, width=180))
    assert (clip.info.width, clip.info.height, clip.info.rotation) == (180, 320, rotation)
    frame = (clip.pixels[:, 0].mean(0) + 1) * 127.5  # 320 x 180, frame 0: dark, with a white marker
    corners = {"top-left": frame[:20, :20], "top-right": frame[:20, -20:], "bottom-left": frame[-20:, :20]}
    marked = {where for where, block in corners.items() if block.mean() > 200}
    # Turned clockwise the stored top-left goes top-right; counter-clockwise, bottom-left.
    assert marked == {"top-right" if rotation == -90 else "bottom-left"}
    assert identities(clip.pixels) == [0, 1]


@pytest.mark.parametrize("name", ["vfr.mp4", "vfr.mkv"])
def test_variable_frame_rate_is_sampled_by_timestamps(media, name):
    video = VideoFile(media[name])
    fps = video.info.fps
    count = video.source.num_frames
    (clip,) = read_clips(media[name], ClipRequest(num_frames=count, height=32, width=32), "k")
    # Grid frame i is the last frame shown by i / fps (a tenth of a frame's slack for rounded timestamps).
    expected = [max(j for j, ms in enumerate(VFR_TIMES_MS) if ms / 1000 <= (i + 0.1) / fps) for i in range(count)]
    assert identities(clip.pixels) == expected
    assert count == int((VFR_TIMES_MS[-1] / 1000) * fps + 0.5) + 1
    if name == "vfr.mkv":  # read at 25 fps, a grid finer than the frames: every frame is shown
        assert sorted(set(expected)) == list(range(len(VFR_TIMES_MS))) and len(expected) > 2 * len(VFR_TIMES_MS)


@pytest.mark.parametrize("name", ["image.jpg", "image.png", "image.webp"])
def test_images_are_one_frame_clips(media, name):
    (clip,) = read_clips(media[name], ClipRequest(num_frames=1, height=48, width=80))
    assert clip.pixels.shape == (3, 1, 48, 80) and identities(clip.pixels) == [5]
    assert (clip.info.fps, clip.info.num_frames, clip.info.codec) == (0.0, 1, {"jpg": "mjpeg"}.get(name[6:], name[6:]))
    with pytest.raises(VideoError, match="an image gives 1 frame, need 4"):
        read_clips(media[name], ClipRequest(num_frames=4, height=48, width=80))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("audio-only.mp4", r"no video stream \(streams: audio\)"),
        ("zero-frames.mp4", r"no frames: the video stream is empty"),
        ("zero-frames-plain.mp4", r"no video stream \(streams: none\)"),
        ("zero-frames.mkv", r"cannot open video \(\d+ bytes\): EOFError"),
        ("truncated-moov-at-end.mp4", r"cannot open video .*moov atom not found"),
        ("truncated-faststart.mp4", r"damaged video: FFmpeg said '.+' \(h264\) while reading the container"),
        ("truncated.mkv", r"damaged video: FFmpeg said 'File ended prematurely' \(matroska,webm\)"),
        ("corrupt-bitstream.mp4", r"damaged video: FFmpeg said '.+' \(h264\)"),
    ],
)
def test_broken_files_are_refused_with_their_reason(media, name, reason):
    with pytest.raises(VideoError, match=reason):
        read_clips(media[name], ClipRequest(num_frames=2, height=32, width=32))


@pytest.mark.parametrize("name", ["h264.mp4", "vp9-odd.webm", "rotate-cw90.mp4", "image.png"])
def test_the_decoders_scaler_gives_the_same_frames_and_nearly_the_same_pixels(media, name):
    size = (72, 40) if name.startswith("rotate") else (40, 72)  # the phone video is shown upright
    request = ClipRequest(num_frames=1, height=size[0], width=size[1])
    (exact,) = read_clips(media[name], request)
    (scaled,) = read_clips(media[name], dataclasses.replace(request, resize="decoder"))
    assert scaled.pixels.shape == exact.pixels.shape == (3, 1, *size)
    assert identities(scaled.pixels) == identities(exact.pixels)
    assert 0 < (scaled.pixels - exact.pixels).abs().mean() < 0.05  # other numbers, the same picture
    # The orientation marker lands on the same pixels (turned, scaled and cropped alike).
    marked = [(clip.pixels[:, 0].mean(0) > 0.5) for clip in (exact, scaled)]
    assert marked[0].any() and (marked[0] != marked[1]).float().mean() < 0.03


def test_frame_and_pixel_limits(media):
    with pytest.raises(VideoError, match=r"over 10 frames \(limits.max_frames\)"):
        VideoFile(media["h264.mp4"], DecodeLimits(max_frames=10))
    assert VideoFile(media["h264.mp4"], DecodeLimits(max_frames=25)).source.num_frames == 25
    with pytest.raises(VideoError, match=r"frames of 641x359 are over limits.max_pixels = 230000"):
        VideoFile(media["vp9-odd.webm"], DecodeLimits(max_pixels=230_000))


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_before_ffmpeg_decodes_it(media):
    # A png header claiming 16000x16000 (FFmpeg would decode it while opening: 768 MB of pixels).
    ihdr = b"IHDR" + (16000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    png = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    with pytest.raises(VideoError, match=r"frames of 16000x16000 are over limits.max_pixels = 67108864"):
        VideoFile(png, DecodeLimits(max_pixels=8192 * 8192))
    assert [image_size(media[f"image.{x}"]) for x in ("jpg", "png", "webp")] == [(160, 96)] * 3
    with pytest.raises(VideoError, match=r"cannot open image \(\d+ bytes\): no size in its header"):
        VideoFile(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(40))


def test_a_decoding_process_returns_every_clip_of_a_sample(media):
    request = ClipRequest(num_frames=5, height=32, width=48, policy="every", every_s=0.4)
    pool = DecodePool(1, timeout=60)
    try:
        clips = pool.submit(media["h264.mp4"], ClipSpec(request), "k").result()
    finally:
        pool.close()
    # every 0.4 s at 25 fps: starts 0, 10, 20 (the room is 25 - 5 = 20)
    assert [c.plan.frames[0] for c in clips] == [0, 10, 20]
    expected = read_clips(media["h264.mp4"], request, "k")
    for got, want in zip(clips, expected, strict=True):
        assert torch.equal(got.pixels, want.pixels) and got.plan == want.plan and got.info == want.info
    assert [identities(c.pixels) for c in clips] == [list(range(s, s + 5)) for s in (0, 10, 20)]
    assert np.all([c.pixels.shape == (3, 5, 32, 48) for c in clips])
