"""Open-Sora's multi-resolution buckets: which size and frame count each clip gets.

A bucket config is Open-Sora's `{resolution: {num_frames: [probability, batch_size]}}`, e.g.
`{"256px": {17: [1.0, 4], 1: [1.0, 16]}}`. Each resolution name stands for an area ("256px":
256 * 256 pixels; "720p": 720 * 1280) and expands into Open-Sora v2's aspect-ratio table, each
size a multiple of `multiple` (Open-Sora's spatial compression times patch size, 16 for its
2D AE). A sample is placed the way Open-Sora v2's `Bucket.get_bucket_id` does it:

1. frames on the grid are divided by the frame interval (`T = total // interval`);
2. resolutions are tried largest first, skipping those whose area the sample does not cover
   (`H * W < 0.8 * area`);
3. a one-frame sample (an image) takes the resolution's 1-frame bucket; a video takes the
   largest frame count `t > 1` with `T >= t`; a probability below 1 is a draw (from one
   generator per sample, seeded by the job seed and the key) that, lost, moves on to the next
   resolution;
4. the aspect ratio is the table's nearest to the sample's `H / W` (first in table order on a tie).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Open-Sora v2's aspect ratios ("W:H"), in its order; the order decides duplicates and ties.
ASPECT_RATIOS = ("2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1")
AREA_COVERED = 0.8  # a sample covers a resolution when it has at least this fraction of its pixels
_RESOLUTION = re.compile(r"^(\d+)(px|p)$")


@dataclass(frozen=True)
class Bucket:
    """One bucket: a size and a frame count, with the config's two numbers for them."""

    resolution: str  # "256px"
    aspect: str  # key of the resolution's aspect-ratio table, "W:H" ("16:9")
    height: int
    width: int
    num_frames: int
    probability: float  # Open-Sora's chance of keeping a sample in this bucket (1.0: always)
    batch_size: int  # clips per encoder call

    @property
    def name(self) -> str:
        return f"{self.resolution}/{self.aspect}/{self.num_frames}"


@dataclass(frozen=True)
class Resolution:
    """One resolution of a bucket config, expanded: its sizes, and its frame counts (largest first)."""

    name: str
    pixels: int
    sizes: tuple[tuple[str, int, int], ...]  # (aspect key, height, width) in table order
    frames: tuple[tuple[int, float, int], ...]  # (num_frames, probability, batch_size), descending

    def nearest_aspect(self, height: int, width: int) -> tuple[str, int, int]:
        ratio = height / width
        return min(self.sizes, key=lambda s: abs(ratio - aspect_value(s[0])))  # min keeps the first of ties


@dataclass(frozen=True)
class BucketTable:
    resolutions: tuple[Resolution, ...]  # largest area first

    def buckets(self) -> list[Bucket]:
        """Every bucket of the table."""
        return [
            Bucket(r.name, aspect, h, w, t, p, bs)
            for r in self.resolutions
            for aspect, h, w in r.sizes
            for t, p, bs in r.frames
        ]

    def frame_counts(self) -> set[int]:
        return {t for r in self.resolutions for t, _, _ in r.frames}

    def choose(
        self, height: int, width: int, total_frames: int, interval: int, rng: np.random.Generator
    ) -> Bucket | None:
        """The bucket of a sample of `height x width` with `total_frames` grid frames; None when none fits."""
        frames = total_frames // interval
        for res in self.resolutions:
            if height * width < res.pixels * AREA_COVERED:
                continue
            chosen = _frame_bucket(res, frames, rng)
            if chosen is not None:
                t, p, bs = chosen
                aspect, h, w = res.nearest_aspect(height, width)
                return Bucket(res.name, aspect, h, w, t, p, bs)
        return None


def _frame_bucket(res: Resolution, frames: int, rng: np.random.Generator) -> tuple[int, float, int] | None:
    if frames == 1:  # an image (or a video of one frame at this interval): the 1-frame bucket only
        for t, p, bs in res.frames:
            if t == 1 and rng.random() < p:
                return t, p, bs
        return None
    for t, p, bs in res.frames:
        if t != 1 and frames >= t:
            # The largest count it fills; a lost draw tries the next resolution, not a smaller count.
            return (t, p, bs) if p >= 1 or rng.random() <= p else None
    return None


def aspect_value(key: str) -> float:
    """`H / W` of an aspect key "W:H"."""
    w, h = key.split(":")
    return float(h) / float(w)


def resolution_pixels(name: str) -> int:
    """The area a resolution name stands for: "256px" is 256 * 256, "720p" is 720 * 1280 (16:9)."""
    m = _RESOLUTION.match(name)
    if m is None:
        raise ValueError(f"unknown resolution '{name}': expected a name such as 256px, 768px, 360p or 720p")
    n = int(m.group(1))
    return n * n if m.group(2) == "px" else int(n * n / 9 * 16)


def aspect_sizes(name: str, multiple: int) -> tuple[tuple[str, int, int], ...]:
    """Open-Sora v2's aspect-ratio table of a resolution (training form): `(key, height, width)`.

    Each ratio's width and height are floored to `multiple`, then one step of `multiple` up or
    down in either side is taken when it brings the area closer to the target; a size that an
    earlier ratio already has is dropped, and each kept ratio also gives its transpose.
    """
    pixels = resolution_pixels(name)
    table: dict[str, tuple[int, int]] = {}
    transposed: dict[str, tuple[int, int]] = {}
    for key in ASPECT_RATIOS:
        wr, hr = (float(x) for x in key.split(":"))
        width = max(multiple, int(math.sqrt(pixels * wr / hr) // multiple) * multiple)
        height = max(multiple, int((pixels / width) // multiple) * multiple)
        best, best_diff = (height, width), abs(height * width - pixels)
        for h, w in (
            (height - multiple, width),
            (height + multiple, width),
            (height, width - multiple),
            (height, width + multiple),
        ):
            if h > 0 and w > 0 and abs(h * w - pixels) < best_diff:
                best, best_diff = (h, w), abs(h * w - pixels)
        if best in table.values():
            continue
        table[key] = best
        transposed[":".join(reversed(key.split(":")))] = (best[1], best[0])
    table.update(transposed)  # a transpose replaces a kept ratio of the same name, as in Open-Sora
    return tuple((key, h, w) for key, (h, w) in table.items())


def bucket_table(config: Mapping[str, Mapping[Any, Any]], multiple: int) -> BucketTable:
    """Expands a bucket config; raises ValueError naming the first entry that is not usable."""
    resolutions = []
    for name, counts in config.items():
        where = f"video.buckets.{name}"
        try:
            pixels = resolution_pixels(str(name))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not isinstance(counts, Mapping) or not counts:
            raise ValueError(f"{where}: expected a mapping of frame counts to [probability, batch_size]")
        frames = []
        for t, value in counts.items():
            if isinstance(t, str) and t.isdigit():
                t = int(t)  # JSON keys are strings
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise ValueError(f"{where}: frame count {t!r} is not a positive integer")
            if (
                not isinstance(value, (list, tuple))
                or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise ValueError(f"{where}.{t}: expected [probability, batch_size], got {value!r}")
            p, bs = float(value[0]), value[1]
            if not 0 < p <= 1:
                raise ValueError(f"{where}.{t}: probability must be in (0, 1]; got {p}")
            if not isinstance(bs, int) or bs < 1:
                raise ValueError(f"{where}.{t}: batch size must be a positive integer; got {bs!r}")
            frames.append((t, p, bs))
        frames.sort(reverse=True)
        resolutions.append(Resolution(str(name), pixels, aspect_sizes(str(name), multiple), tuple(frames)))
    resolutions.sort(key=lambda r: r.pixels, reverse=True)  # a stable sort: equal areas keep config order
    return BucketTable(tuple(resolutions))
