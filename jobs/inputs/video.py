"""Decode the start of a video with PyAV and shape it the way Open-Sora's dataset does.

Frames are decoded one at a time and resized/cropped immediately, so memory is bounded by
the clip, never by the video. Resize-to-cover uses float bilinear interpolation without
antialiasing, the centre crop rounds like Open-Sora's `resize_crop_to_fill`, and pixels are
mapped to [-1, 1] with mean 0.5 and std 0.5: the same numbers the trainer would compute.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import av
import torch
import torch.nn.functional as F
from torch import Tensor

from vae.errors import describe_error


class VideoError(ValueError):
    """A video that cannot give the requested clip; the message is the error row's reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream (before any resizing)."""

    width: int
    height: int
    fps: float
    num_frames: int  # as reported by the container; 0 when unknown
    duration: float  # seconds; 0.0 when unknown
    codec: str


@dataclass
class Clip:
    pixels: Tensor  # C T H W float32 in [-1, 1]
    info: VideoInfo


# The containers the job decodes, recognised by their first bytes. FFmpeg's own probing is never
# used: it also takes playlists, concat scripts and SDP files, which open other files or sockets.
CONTAINERS = {"mov": "mp4/mov/m4v", "matroska": "mkv/webm", "avi": "avi"}
_MOV_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
# The mov demuxer can follow "data references" to other files; they stay off.
_DEMUXER_OPTIONS = {"mov": {"enable_drefs": "0", "use_absolute_path": "0"}}


def container_format(data: bytes) -> str | None:
    """FFmpeg's demuxer for a supported container, from the file's magic bytes; None otherwise."""
    if data[4:8] in _MOV_BOXES:
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def read_clip(
    data: bytes,
    num_frames: int,
    height: int,
    width: int,
    threads: int = 0,
    max_pixels: int | None = None,
    timeout: float | None = None,
) -> Clip:
    """Decodes the first `num_frames` frames of an encoded video and resizes/crops them.

    Args:
        data: The encoded video file.
        num_frames: Frames to take from the start.
        height: Output height (resize to cover, then centre crop).
        width: Output width.
        threads: FFmpeg decoding threads (0 = FFmpeg's choice, one per core: too many when
            several actors share a node).
        max_pixels: Frames of more pixels (W * H) are refused before any is decoded.
        timeout: Seconds the decoding may take, checked after every frame.

    Raises:
        VideoError: Not a supported container, no video stream, frames over `max_pixels`,
            undecodable, slower than `timeout`, or fewer than `num_frames` frames.
    """
    started = time.monotonic()
    fmt = container_format(data)
    if fmt is None:
        raise VideoError(
            f"cannot open video ({len(data)} bytes): not a supported container "
            f"({', '.join(CONTAINERS.values())}); it starts with {data[:12]!r}"
        )
    try:
        container = av.open(io.BytesIO(data), mode="r", format=fmt, options=_DEMUXER_OPTIONS.get(fmt, {}))
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise VideoError(f"cannot open video ({len(data)} bytes): {describe_error(e)}") from e
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise VideoError(f"no video stream (streams: {kinds})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        info = _info(container, stream)
        _check_pixels(info.width, info.height, max_pixels)
        frames: list[Tensor] = []
        try:
            for frame in container.decode(stream):
                _check_pixels(frame.width, frame.height, max_pixels)
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                frames.append(resize_crop(rgb.permute(2, 0, 1)[None], height, width)[0])
                if len(frames) == num_frames:
                    break
                if timeout is not None and time.monotonic() - started > timeout:
                    raise VideoError(
                        f"decoding took over {timeout:g} s ({len(frames)} frames; limits.decode_timeout_s)"
                    )
        except VideoError:
            raise
        except (av.FFmpegError, ValueError) as e:
            raise VideoError(f"decoding failed after {len(frames)} frames: {describe_error(e)}") from e
    if len(frames) < num_frames:
        claimed = (
            f" although the container claims {info.num_frames} (truncated file?)"
            if info.num_frames > len(frames)
            else ""
        )
        raise VideoError(f"too short: decoded {len(frames)} frames{claimed}, need {num_frames}")
    pixels = torch.stack(frames, dim=1)  # C T H W
    return Clip(pixels=pixels.mul_(2.0).sub_(1.0), info=info)


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoError(f"frames of {width}x{height} are over limits.max_pixels = {max_pixels}")


def resize_crop(frames: Tensor, height: int, width: int) -> Tensor:
    """Resizes uint8 `N C H W` frames to cover `height x width`, then crops the centre.

    Returns float32 in [0, 1], like Open-Sora's `ToTensorVideo` followed by `ResizeCrop`.
    """
    x = frames.float().div_(255.0)
    h, w = x.shape[-2:]
    scale_h, scale_w = height / h, width / w
    if scale_h > scale_w:  # height is the tight side; width overflows and is cropped
        size = (height, round(w * scale_h))
    else:
        size = (round(h * scale_w), width)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[..., top : top + height, left : left + width]


def _info(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate or 0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = (container.duration or 0) / av.time_base
    return VideoInfo(
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        fps=float(rate),
        num_frames=stream.frames or 0,
        duration=duration,
        codec=stream.codec_context.name,
    )
