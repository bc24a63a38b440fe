"""Frame sampling and buckets against Open-Sora's rules, with every expected number worked out by hand."""

from __future__ import annotations

import pytest

from jobs.inputs.buckets import aspect_sizes, bucket_table, resolution_pixels
from jobs.inputs.sampling import ClipRequest, Source, VideoError, clip_indices, frame_interval, plan_clips

# Open-Sora v2's tables (opensora/datasets/aspect.py, training form, multiple 16), as its own code gives them.
OPEN_SORA_256PX = {
    "2.39:1": (160, 400),
    "2:1": (176, 368),
    "16:9": (192, 336),
    "9:16": (336, 192),
    "3:2": (208, 320),
    "4:3": (224, 288),
    "1:1": (256, 256),
    "1:2.39": (400, 160),
    "1:2": (368, 176),
    "2:3": (320, 208),
    "3:4": (288, 224),
}
OPEN_SORA_768PX = {
    "2.39:1": (496, 1184),
    "2:1": (544, 1088),
    "16:9": (576, 1024),
    "1.85:1": (560, 1056),
    "9:16": (1024, 576),
    "5:8": (992, 592),
    "3:2": (624, 944),
    "4:3": (672, 880),
    "1:1": (768, 768),
    "1:2.39": (1184, 496),
    "1:2": (1088, 544),
    "1:1.85": (1056, 560),
    "8:5": (592, 992),
    "2:3": (944, 624),
    "3:4": (880, 672),
}


def video(width: int = 1920, height: int = 1080, frames: int = 100, fps: float = 25.0) -> Source:
    return Source(width=width, height=height, num_frames=frames, fps=fps)


def test_aspect_tables_are_open_soras_in_its_order():
    for name, table in (("256px", OPEN_SORA_256PX), ("768px", OPEN_SORA_768PX)):
        sizes = aspect_sizes(name, 16)
        assert [k for k, _, _ in sizes] == list(table) and {k: (h, w) for k, h, w in sizes} == table
    assert resolution_pixels("720p") == 1280 * 720 and resolution_pixels("256px") == 256 * 256
    with pytest.raises(ValueError, match="unknown resolution '256'"):
        resolution_pixels("256")


def test_frame_interval_and_indices_follow_open_sora():
    assert [frame_interval(f, 24) for f in (12, 24, 25, 30, 60, 0)] == [1, 1, 2, 2, 3, 1]
    assert frame_interval(60, None) == 1
    # linspace(0, 9, 5) truncated: the spacing is 9/4, not the interval 2.
    assert clip_indices(0, 5, 2, 100) == (0, 2, 4, 6, 9)
    assert clip_indices(0, 33, 2, 1000)[-3:] == (60, 62, 65)
    # A window past the end is cut there: linspace(90, 99, 5) = 90, 92.25, 94.5, 96.75, 99.
    assert clip_indices(90, 5, 4, 100) == (90, 92, 94, 96, 99)


def test_clip_policies():
    request = ClipRequest(num_frames=17, height=64, width=64)
    src = video(frames=100)
    assert plan_clips(src, request, "k")[0].frames == tuple(range(17))
    # middle: 100 - 17 = 83 frames of room, half of it (41) before the clip.
    (middle,) = plan_clips(src, ClipRequest(17, 64, 64, policy="middle"), "k")
    assert middle.frames == tuple(range(41, 58))
    # uniform, at most 3: min(3, 100 // 17) clips starting at linspace(0, 83, 3) = 0, 41, 83.
    clips = plan_clips(src, ClipRequest(17, 64, 64, policy="uniform", max_clips=3), "k")
    assert [c.frames[0] for c in clips] == [0, 41, 83] and clips[-1].frames[-1] == 99
    assert [c.index for c in clips] == [0, 1, 2]
    # uniform never overlaps: 40 frames hold 2 clips of 17, whatever max_clips says.
    assert [c.frames[0] for c in plan_clips(video(frames=40), ClipRequest(17, 64, 64, policy="uniform"), "k")] == [
        0,
        23,
    ]
    # every 1.0 s at 25 fps: starts 0, 25, 50, 75 (a clip at 100 would not fit).
    every = plan_clips(src, ClipRequest(17, 64, 64, policy="every", every_s=1.0, max_clips=8), "k")
    assert [c.frames[0] for c in every] == [0, 25, 50, 75]
    assert len(plan_clips(src, ClipRequest(17, 64, 64, policy="every", every_s=1.0, max_clips=2), "k")) == 2


def test_random_starts_are_seeded_by_the_job_seed_and_the_key_in_open_soras_range():
    request = ClipRequest(17, 64, 64, policy="random", seed=3)
    starts = {key: plan_clips(video(frames=60), request, key)[0].frames[0] for key in map(str, range(200))}
    assert starts == {key: plan_clips(video(frames=60), request, key)[0].frames[0] for key in starts}  # reruns agree
    # randint(0, max(0, 60 - 17 - 1)): 0..42; the last start, 43, is never drawn.
    assert min(starts.values()) == 0 and max(starts.values()) == 42 and len(set(starts.values())) > 30
    other = ClipRequest(17, 64, 64, policy="random", seed=4)
    assert starts != {key: plan_clips(video(frames=60), other, key)[0].frames[0] for key in starts}
    # Exactly as long as the clip: the only start is 0.
    assert plan_clips(video(frames=17), request, "k")[0].frames == tuple(range(17))


def test_target_fps_spreads_the_clip_over_its_window():
    # 60 fps down to at most 24: interval ceil(2.5) = 3, window 51, linspace(0, 50, 17) truncated.
    (clip,) = plan_clips(video(fps=60, frames=200), ClipRequest(17, 64, 64, fps_max=24), "k")
    assert clip.stride == 3
    assert clip.frames == (0, 3, 6, 9, 12, 15, 18, 21, 25, 28, 31, 34, 37, 40, 43, 46, 50)


def test_too_short_and_images():
    with pytest.raises(VideoError, match="too short: 16 frames, need 17"):
        plan_clips(video(frames=16), ClipRequest(17, 64, 64), "k")
    with pytest.raises(VideoError, match="an image gives 1 frame, need 17"):
        plan_clips(Source(64, 64, 1, 0.0), ClipRequest(17, 64, 64), "k")
    assert plan_clips(Source(64, 64, 1, 0.0), ClipRequest(1, 32, 32), "k")[0].frames == (0,)


BUCKETS = {"256px": {17: [1.0, 4], 1: [1.0, 16], 9: [1.0, 8]}}


def bucketed(config=BUCKETS, **kw) -> ClipRequest:
    return ClipRequest(buckets=bucket_table(config, 16), **kw)


@pytest.mark.parametrize(
    ("src", "bucket", "size"),
    [
        (video(1920, 1080, 100), "256px/16:9/17", (192, 336)),  # 16:9 exactly
        (video(1080, 1920, 100), "256px/9:16/17", (336, 192)),  # a phone's portrait video
        (video(640, 480, 12), "256px/4:3/9", (224, 288)),  # 12 frames fill 9, not 17
        (video(641, 359, 17), "256px/16:9/17", (192, 336)),  # 359/641 = 0.560: nearest 9/16 = 0.5625
        (video(400, 160, 30), "256px/2.39:1/17", (160, 400)),  # 64,000 px >= 0.8 * 65,536
        (Source(300, 300, 1, 0.0), "256px/1:1/1", (256, 256)),  # an image: the 1-frame bucket
    ],
)
def test_a_clip_goes_to_the_nearest_aspect_it_covers_and_the_most_frames_it_fills(src, bucket, size):
    (clip,) = plan_clips(src, bucketed(), "k")
    assert clip.bucket is not None and clip.bucket.name == bucket and (clip.height, clip.width) == size
    assert clip.num_frames == clip.bucket.num_frames and clip.bucket.batch_size == BUCKETS["256px"][clip.num_frames][1]


def test_what_fits_no_bucket():
    # 176x144 = 25,344 px < 0.8 * 256 * 256; 8 frames fill no video bucket (a video never takes t = 1).
    with pytest.raises(VideoError, match="fits no bucket: 176x144, 100 frames"):
        plan_clips(video(176, 144, 100), bucketed(), "k")
    with pytest.raises(VideoError, match="fits no bucket: 640x480, 8 frames"):
        plan_clips(video(640, 480, 8), bucketed(), "k")
    # At 60 fps and fps_max 24 the interval is 3: 40 // 3 = 13 frames fill 9, not 17 (window 27).
    (clip,) = plan_clips(video(640, 480, 40, fps=60), bucketed(fps_max=24), "k")
    assert clip.bucket.name == "256px/4:3/9" and clip.frames == (0, 3, 6, 9, 13, 16, 19, 22, 26)


def test_larger_resolutions_first_and_probabilities_seeded_per_key():
    config = {"256px": {1: [1.0, 16], 17: [1.0, 4]}, "768px": {1: [0.5, 2]}}
    request = bucketed(config, seed=7)
    names = {key: plan_clips(Source(1024, 1024, 1, 0.0), request, key)[0].bucket.name for key in map(str, range(100))}
    assert set(names.values()) == {"768px/1:1/1", "256px/1:1/1"}
    assert 30 < sum(n.startswith("768px") for n in names.values()) < 70  # about half keep the 0.5 draw
    assert names == {key: plan_clips(Source(1024, 1024, 1, 0.0), request, key)[0].bucket.name for key in names}
    # Too small for 768px (0.8 * 768^2 = 471,859 px): always 256px, no draw.
    assert plan_clips(Source(640, 640, 1, 0.0), request, "k")[0].bucket.name == "256px/1:1/1"
    # 768px has no video bucket: a video falls to 256px.
    assert plan_clips(video(1024, 1024, 40), request, "k")[0].bucket.name == "256px/1:1/17"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"256": {17: [1.0, 4]}}, "video.buckets.256: unknown resolution"),
        ({"256px": {}}, "expected a mapping of frame counts"),
        ({"256px": {0: [1.0, 4]}}, "frame count 0 is not a positive integer"),
        ({"256px": {17: [1.5, 4]}}, r"probability must be in \(0, 1\]"),
        ({"256px": {17: [1.0, 2.5]}}, "batch size must be a positive integer"),
        ({"256px": {17: 4}}, r"expected \[probability, batch_size\]"),
    ],
)
def test_bad_bucket_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        bucket_table(config, 16)
