"""Write clips and images with PyAV, the way Open-Sora's `save_sample` does.

A clip in [-1, 1] is clamped, shifted to [0, 1] and mapped to 8 bit with `x * 255 + 0.5`
(then truncated), and written as H.264 at crf 23; a one-frame clip becomes a PNG instead.
PNGs are encoded with FFmpeg's PNG encoder through PyAV, so no imaging library is needed.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor

DEFAULT_FPS = 16  # Open-Sora's save fps when none is known


def to_uint8(x: Tensor) -> Tensor:
    """Pixels in [-1, 1] (any layout) -> uint8, rounding like `save_sample`."""
    x = x.detach().float().clamp(-1.0, 1.0).add(1.0).div(2.0)
    return x.mul(255.0).add(0.5).clamp(0.0, 255.0).to(torch.uint8)


def save_clip(pixels: Tensor, stem: str | Path, fps: float | None, crf: int = 23) -> Path:
    """Writes a `C T H W` clip in [-1, 1] to `stem.mp4` (H.264), or `stem.png` if it has one frame.

    Returns:
        The path written.
    """
    frames = to_uint8(pixels).permute(1, 2, 3, 0).cpu().numpy()  # T H W C
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if frames.shape[0] == 1:
        path = stem.with_name(stem.name + ".png")
        write_png(path, frames[0])
        return path
    path = stem.with_name(stem.name + ".mp4")
    write_mp4(path, frames, fps or DEFAULT_FPS, crf)
    return path


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 23) -> None:
    """Encodes `T H W 3` uint8 frames as H.264 (yuv420p; H and W must be even)."""
    rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 2997/100, 24.0 -> 24
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = t
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of one `H W 3` uint8 image."""
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    return b"".join(bytes(packet) for packet in [*codec.encode(frame), *codec.encode(None)])


def write_png(path: str | Path, image: np.ndarray) -> None:
    Path(path).write_bytes(encode_png(image))


def read_image(path: str | Path) -> np.ndarray:
    """The first frame of an image or video file as `H W 3` uint8 (for checks and tests)."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="rgb24")


def preview_grid(top: Tensor, bottom: Tensor, count: int, gap: int = 2) -> np.ndarray:
    """A two-row picture: `count` evenly spaced frames of `top` above the same frames of `bottom`.

    Args:
        top, bottom: `C T H W` clips in [-1, 1] of the same shape (e.g. original, reconstruction).
        count: Frames shown (all of them if the clip is shorter).
        gap: White pixels between tiles.

    Returns:
        `H W 3` uint8 image.
    """
    if top.shape != bottom.shape:
        raise ValueError(f"clips differ in shape: {tuple(top.shape)} vs {tuple(bottom.shape)}")
    _, t, h, w = top.shape
    picks = torch.linspace(0, t - 1, min(count, t)).round().long().unique()
    n = len(picks)
    grid = np.full((2 * h + gap, n * w + (n - 1) * gap, 3), 255, np.uint8)
    for row, clip in enumerate((top, bottom)):
        tiles = to_uint8(clip[:, picks]).permute(1, 2, 3, 0).cpu().numpy()  # n H W C
        for i, tile in enumerate(tiles):
            y, x = row * (h + gap), i * (w + gap)
            grid[y : y + h, x : x + w] = tile
    return grid
