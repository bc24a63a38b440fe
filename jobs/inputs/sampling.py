"""Which frames of a video become which clips: Open-Sora's frame sampling, as pure arithmetic.

Frames are counted on a uniform time grid at the video's average frame rate (`jobs.inputs.video`
maps grid frame `i` to the frame on display at that time, so a variable-rate video is sampled
by its timestamps and a constant-rate one by its frame numbers). From the grid's length:

    interval = ceil(fps / fps_max)            (1 without a target fps)
    window   = num_frames * interval          grid frames a clip spans
    indices  = linspace(start, end - 1, num_frames), truncated to integers, end = min(start + window, N)

exactly as Open-Sora's `temporal_random_crop` computes them. Where a clip starts is the clip
policy: `first`, `middle`, `random` (Open-Sora's range, seeded by the job seed and the sample key,
so reruns agree), `uniform` (up to `max_clips` clips evenly spaced, none overlapping) or `every`
(a clip every `every_s` seconds, up to `max_clips`). With buckets (`jobs.inputs.buckets`) the
frame count and size of each clip come from its bucket.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from jobs.inputs.buckets import Bucket, BucketTable

ClipPolicy = Literal["first", "middle", "random", "uniform", "every"]
# exact: Open-Sora's float bilinear resize (the trainer's own pixels); decoder: FFmpeg's scaler to the
# cover size in uint8 (memory bounded by the clip, not the source; pixels differ slightly)
ResizeMode = Literal["exact", "decoder"]
MULTI_CLIP_POLICIES = ("uniform", "every")


class VideoError(ValueError):
    """A sample that cannot give the requested clips; the message is the error row's reason."""


@dataclass(frozen=True)
class ClipRequest:
    """What to cut out of every sample (the job's `video` section, resolved for one VAE)."""

    num_frames: int = 17  # without buckets: every clip's frame count and size
    height: int = 256
    width: int = 256
    fps_max: float | None = None  # target frame rate: keep every `ceil(fps / fps_max)`-th frame
    policy: ClipPolicy = "first"
    max_clips: int = 8  # most clips per video (`uniform`, `every`)
    every_s: float = 10.0  # seconds between clip starts (`every`)
    seed: int = 0  # the job seed, for `random` starts and bucket probabilities
    buckets: BucketTable | None = None  # None: the fixed size above
    resize: ResizeMode = "exact"

    @property
    def multi_clip(self) -> bool:
        """Whether a video may give several clips (then every output name carries a clip number)."""
        return self.policy in MULTI_CLIP_POLICIES and self.max_clips > 1


@dataclass(frozen=True)
class Source:
    """What the sampling needs to know of a decoded sample."""

    width: int  # as displayed (rotation applied)
    height: int
    num_frames: int  # frames on the time grid (1 for an image)
    fps: float  # average frame rate (0.0 when unknown, as for an image)


@dataclass(frozen=True)
class ClipPlan:
    """One clip to decode: grid frame indices and the size they are resized and cropped to."""

    index: int  # clip number within its video
    frames: tuple[int, ...]
    stride: int  # Open-Sora's frame interval
    height: int
    width: int
    bucket: Bucket | None = None

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def nbytes(self) -> int:
        return 3 * self.num_frames * self.height * self.width * 4  # float32


def keyed_rng(seed: int, key: str, purpose: str) -> np.random.Generator:
    """A generator that depends only on the job seed, the sample key and what it is for."""
    digest = hashlib.sha256(f"{seed}:{key}:{purpose}".encode("utf-8", "backslashreplace")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def frame_interval(fps: float, fps_max: float | None) -> int:
    """Open-Sora's frame interval: every `ceil(fps / fps_max)`-th frame, at least 1."""
    if fps_max is None or fps <= 0:
        return 1
    return max(1, math.ceil(fps / fps_max))


def clip_indices(start: int, num_frames: int, interval: int, total: int) -> tuple[int, ...]:
    """Open-Sora's indices: `num_frames` evenly spaced in the window `[start, start + num_frames * interval)`,
    cut at the end of the video."""
    end = min(start + num_frames * interval, total)
    return tuple(int(i) for i in np.linspace(start, end - 1, num_frames, dtype=int))


def clip_starts(request: ClipRequest, total: int, window: int, fps: float, key: str) -> list[int]:
    """Where each clip of a `total`-frame video starts, for clips spanning `window` frames."""
    room = max(0, total - window)
    policy = request.policy
    if policy == "first":
        return [0]
    if policy == "middle":
        return [room // 2]
    if policy == "random":  # Open-Sora's TemporalRandomCrop: randint(0, max(0, total - window - 1))
        return [int(keyed_rng(request.seed, key, "start").integers(0, max(0, total - window - 1), endpoint=True))]
    if policy == "uniform":
        count = max(1, min(request.max_clips, total // window))
        return [int(s) for s in np.linspace(0, room, count, dtype=int)] if count > 1 else [room // 2]
    # every: a clip each `every_s` seconds while a whole window fits (at least the first)
    step = max(1, round(request.every_s * fps)) if fps > 0 else total
    starts = list(range(0, room + 1, step))[: request.max_clips]
    return starts or [0]


def plan_clips(source: Source, request: ClipRequest, key: str) -> list[ClipPlan]:
    """The clips of one sample, in order.

    Raises:
        VideoError: The sample cannot give any clip (too short, an image where clips need more
            frames, no bucket it fits).
    """
    if source.num_frames < 1:
        raise VideoError("no frames decoded (an empty video stream)")
    interval = frame_interval(source.fps, request.fps_max)
    bucket = None
    if request.buckets is not None:
        rng = keyed_rng(request.seed, key, "bucket")
        bucket = request.buckets.choose(source.height, source.width, source.num_frames, interval, rng)
        if bucket is None:
            raise VideoError(
                f"fits no bucket: {source.width}x{source.height}, {source.num_frames} frames "
                f"({source.num_frames // interval} at interval {interval})"
            )
        num_frames, height, width = bucket.num_frames, bucket.height, bucket.width
    else:
        num_frames, height, width = request.num_frames, request.height, request.width
    if source.num_frames < num_frames:
        kind = "an image gives 1 frame" if source.fps <= 0 else f"too short: {source.num_frames} frames"
        raise VideoError(f"{kind}, need {num_frames}")
    window = num_frames * interval
    starts = clip_starts(request, source.num_frames, window, source.fps, key)
    return [
        ClipPlan(
            index=i,
            frames=clip_indices(start, num_frames, interval, source.num_frames),
            stride=interval,
            height=height,
            width=width,
            bucket=bucket,
        )
        for i, start in enumerate(starts)
    ]
