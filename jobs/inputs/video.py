"""Decode the clips of a video with PyAV and shape them the way Open-Sora's dataset does.

A sample is opened twice. The first pass reads the container's packets without decoding them
(plus the first frame, for its size and rotation): it gives the frame timestamps, from which
`jobs.inputs.sampling` plans the clips on a uniform time grid at the average frame rate. The
second pass seeks near each clip's start and decodes until its last frame; grid frame `i` is
the frame on display at time `t0 + i / fps` (allowing timestamps a tenth of a frame late, or a
coarse time base late), so a constant-rate video is sampled by frame number and a variable-rate
one by time; frames an edit list hides are not on the grid, and a video whose decoded timestamps
go backwards is taken in the decoder's order. Frames are resized and cropped as they come, so
memory is bounded by the clip, never by the video.

Pixels follow Open-Sora's video path: resize to cover with float bilinear interpolation (no
antialiasing), the centre crop rounded like its `ResizeCrop`, and [-1, 1] from mean 0.5 and std
0.5. Unlike its reader, the display rotation is applied (a phone's portrait video is shaped as it
is shown). Images (jpg, png, webp) are one-frame clips, shaped as video frames are (Open-Sora's
image path resizes with PIL's antialiased bicubic instead).
"""

from __future__ import annotations

import glob
import io
import math
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from jobs.inputs.sampling import ClipPlan, ClipRequest, ResizeMode, Source, VideoError, plan_clips
from vae.errors import describe_error

__all__ = [
    "Clip",
    "DecodeLimits",
    "FrameSizeChanged",
    "VideoError",
    "VideoFile",
    "VideoInfo",
    "read_clip",
    "read_clips",
    "read_frames",
    "signed_unit",
]


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream (before any resizing)."""

    width: int  # as displayed: the rotation applied
    height: int
    fps: float  # average frame rate; 0.0 for an image
    num_frames: int  # frames on the time grid at `fps` (what the sampling counts; 1 for an image)
    duration: float  # seconds; 0.0 when unknown
    codec: str
    rotation: int = 0  # degrees the stored frames are turned counter-clockwise for display
    packets: int = 0  # frames the file shows (its video packets, less any an edit list hides)
    claimed_frames: int = 0  # frames the container's header claims; 0 when it does not say


@dataclass
class Clip:
    # C T H W: float32 in [-1, 1]; or, from the decoding processes where no frame needed a float
    # resize, uint8 in [0, 255] (a quarter of the bytes), brought to [-1, 1] by `signed_unit`
    pixels: Tensor
    info: VideoInfo
    plan: ClipPlan


def signed_unit(pixels: Tensor) -> Tensor:
    """uint8 pixels as float32 in [-1, 1] (float pixels are returned as they are): the same
    operations, in the same order, as the float path of `VideoFile.decode`, so the values are
    bit for bit the ones it gives, on any device.

    The divisor is a tensor on the pixels' device, not a number: CUDA divides by a number as a
    multiplication by its reciprocal, one bit off for 111 of the 256 values, and by a tensor as the
    CPU does (a correctly rounded division). `torch.full` makes it there without a copy from the host."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.float().div_(torch.full((), 255.0, device=pixels.device)).mul_(2.0).sub_(1.0)


class _TimestampsOutOfOrder(Exception):
    """The decoder gave a frame an earlier timestamp than the frame before it."""


class FrameSizeChanged(VideoError):
    """A frame of a clip planned as whole pixels (uint8) needs a resize after all: its size differs
    from the first frame's. The clip is decoded again in float32."""


def _cpu_waits(pid: int | None) -> dict[str, float] | None:
    """Seconds each thread has been ready to run but kept waiting for a CPU (Linux's schedstat): this
    thread's (None), or every thread's of process `pid`; None where the kernel does not say."""
    paths = ["/proc/thread-self/schedstat"] if pid is None else glob.glob(f"/proc/{pid}/task/*/schedstat")
    waits = {}
    for path in paths:
        try:
            with open(path) as f:
                waits[path] = int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return waits or None


class RunClock:
    """The seconds a decode could run since the clock started: the wall time less the most that any
    of its threads was kept waiting for a CPU meanwhile (this thread, or process `pid`'s threads).

    A decode's time limit is counted on it, so that a decoding process kept waiting by the model
    (they run at a lower priority, `run.decode_priority`) is not taken for a slow one, while one that
    hangs, spinning or blocked, is still stopped. Where the kernel does not say, it is wall time.
    A wait is counted once the thread gets its CPU back (the kernel adds it then).
    """

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.started = time.monotonic()
        self._start = _cpu_waits(pid)  # None: wall time only
        self._waited = 0.0  # the most a thread had waited since the start, at the last reading

    def wall(self) -> float:
        return time.monotonic() - self.started

    def seconds(self) -> float:
        if self._start is not None:
            now = _cpu_waits(self.pid) or {}  # a failed reading keeps the last one
            start = self._start
            self._waited = max([self._waited, *(w - start.get(path, 0.0) for path, w in now.items())])
        return self.wall() - self._waited


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one sample may cost; over a limit, the sample is an error row naming it."""

    max_pixels: int | None = None  # frames of more pixels (W * H) are refused before any is decoded
    max_frames: int | None = None  # frames (packets) a sample may hold, and decode per clip
    timeout: float | None = None  # seconds, checked after every frame
    threads: int = 1  # FFmpeg decoding threads (0: FFmpeg's choice, one per core)


# The containers the job decodes, recognised by their first bytes. FFmpeg's own probing is never
# used: it also takes playlists, concat scripts and SDP files, which open other files or sockets.
CONTAINERS = {
    "mov": "mp4/mov/m4v",
    "matroska": "mkv/webm",
    "avi": "avi",
    "jpeg_pipe": "jpg",
    "png_pipe": "png",
    "webp_pipe": "webp",
}
IMAGE_FORMATS = {"jpeg_pipe", "png_pipe", "webp_pipe"}
_MOV_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
# A frame may start this fraction of a frame period late and still count as on display at a grid
# time (`VideoFile.slack`), or more where the time base is coarse: a timestamp rounded to it (1 ms
# in mkv, a quarter of a frame at 240 fps) is up to half of it late.
TIMESTAMP_SLACK = 0.1
# FFmpeg's messages that mean the file is damaged even when no call fails: a truncated mkv only
# says "File ended prematurely", a cut mp4 "partial file", a corrupt bitstream logs its errors.
_DAMAGE_WARNINGS = ("ended prematurely", "partial file", "truncat")
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
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg_pipe"
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return "png_pipe"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp_pipe"
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """`(width, height)` from a png, jpeg or webp header, read without decoding; None if not found."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        kind = data[12:16]
        if kind == b"VP8X":  # canvas size minus one, 24-bit little-endian
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if kind == b"VP8 ":  # lossy: 14-bit sizes after the key frame's start code
            return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
        if kind == b"VP8L":  # lossless: 14-bit sizes minus one, packed after the signature byte
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return None
    if data[:2] == b"\xff\xd8":  # jpeg: walk the segments to a start-of-frame marker
        at = 2
        while at + 9 <= len(data):
            if data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                at += 2
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[at + 7 : at + 9], "big"), int.from_bytes(data[at + 5 : at + 7], "big")
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


class VideoFile:
    """An encoded sample, probed: its `info`, its `source` (what sampling needs), and its clips.

    Raises (from the constructor):
        VideoError: Not a supported container, no video stream, no frame, or over a limit.
    """

    def __init__(self, data: bytes, limits: DecodeLimits = DecodeLimits()) -> None:
        self.data = data
        self.limits = limits
        self.clock = RunClock()
        self.frames_decoded = 0  # by `decode`, over all clips (seeking keeps it near the clips' lengths)
        self.format = container_format(data)
        if self.format is None:
            raise VideoError(
                f"cannot open video ({len(data)} bytes): not a supported container "
                f"({', '.join(CONTAINERS.values())}); it starts with {data[:12]!r}"
            )
        self.image = self.format in IMAGE_FORMATS
        if self.image:  # FFmpeg decodes an image while it opens it: its size is checked first
            size = image_size(data)
            if size is None:
                raise VideoError(f"cannot open image ({len(data)} bytes): no size in its header")
            self._check_size(*size)
        with _ffmpeg_log() as log, self._opened() as container:
            stream = container.streams.video[0]
            self.time_base = float(stream.time_base or 0)
            times, hidden, first = self._scan(container, stream)
            _raise_on_damage(log, "reading the container")
            claimed = 0 if self.image else stream.frames or 0
            rate = 0.0 if self.image else float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
            codec = stream.codec_context.name
        if not times:
            raise VideoError(f"no frames: the video stream is empty (the container claims {claimed})")
        if claimed > len(times) + hidden:  # (the container counts the hidden ones too)
            raise VideoError(f"truncated: the container promises {claimed} frames, {len(times)} are in the file")
        if first is None:
            raise VideoError(f"no frame could be decoded of {len(times)} in the container")
        times = array("d", sorted(times))  # packets come in decoding order
        if rate <= 0 and len(times) > 1 and times[-1] > times[0]:
            rate = (len(times) - 1) / (times[-1] - times[0])
        self.t0 = times[0]
        self.fps = rate
        # (twice the rounding, for margin; at most half a frame, past which no slack tells frames apart)
        self.slack = min(0.5, max(TIMESTAMP_SLACK, self.time_base * rate))
        self.timed = not math.isnan(self.t0)
        if self.image or rate <= 0:
            grid = 1
        elif self.timed:
            grid = math.floor((times[-1] - self.t0) * rate + 0.5) + 1
        else:
            grid = len(times)
        rotation = first.rotation
        width, height = (first.height, first.width) if rotation % 180 else (first.width, first.height)
        self.info = VideoInfo(width, height, rate, grid, duration, codec, rotation, len(times), claimed)
        self.source = Source(width=width, height=height, num_frames=grid, fps=rate)

    @contextmanager
    def _opened(self) -> Iterator[av.container.InputContainer]:
        """The container, freed on the way out only once its decoder's frame threads are idle."""
        container = self._open()
        try:
            yield container
        finally:
            _drain(container.streams.video[0])
            container.close()

    def _open(self) -> av.container.InputContainer:
        assert self.format is not None
        try:
            container = av.open(
                io.BytesIO(self.data), mode="r", format=self.format, options=_DEMUXER_OPTIONS.get(self.format, {})
            )
        except (av.FFmpegError, ValueError, IndexError) as e:
            raise VideoError(f"cannot open video ({len(self.data)} bytes): {describe_error(e)}") from e
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            container.close()
            raise VideoError(f"no video stream (streams: {kinds})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = self.limits.threads
        return container

    def _scan(
        self, container: av.container.InputContainer, stream: av.video.stream.VideoStream
    ) -> tuple[array[float], int, av.VideoFrame | None]:
        """Every shown packet's presentation time (NaN where it has none); how many packets are
        decoded but never shown (before the start of an mp4's edit list, as a cut made without
        re-encoding leaves them: FFmpeg flags them "discard", and neither it nor Open-Sora's reader
        returns their frames); and the first decoded frame."""
        times: array[float] = array("d")
        hidden = 0
        first = None
        limit = self.limits.max_frames
        self._check_size(stream.codec_context.width, stream.codec_context.height)  # before any frame is decoded
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream packet
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                if packet.is_discard:
                    hidden += 1  # (still decoded: the frames shown after it may refer to it)
                else:
                    times.append(math.nan if pts is None else pts * self.time_base)
                if limit is not None and len(times) + hidden > limit:
                    raise VideoError(f"over {limit} frames (limits.max_frames)")
                if first is None:
                    for frame in stream.decode(packet):
                        self._check_frame(frame)
                        first = frame
                        break
            if first is None:
                for frame in stream.decode(None):  # frames the decoder still holds (frame threading)
                    self._check_frame(frame)
                    first = frame
                    break
        except VideoError:
            raise
        except (av.FFmpegError, ValueError) as e:
            if not times:
                raise VideoError(f"cannot read video packets: {describe_error(e)}") from e
            # A damaged tail: the frames before it are what the sample holds.
        return times, hidden, first

    def _check_frame(self, frame: av.VideoFrame) -> None:
        self._check_size(frame.width, frame.height)

    def _check_size(self, width: int, height: int) -> None:
        m = self.limits.max_pixels
        if m is not None and width * height > m:
            raise VideoError(f"frames of {width}x{height} are over limits.max_pixels = {m}")

    def _check_time(self, decoded: int) -> None:
        t = self.limits.timeout
        if t is not None and self.clock.wall() > t and self.clock.seconds() > t:
            raise VideoError(f"decoding took over {t:g} s ({decoded} frames; limits.decode_timeout_s)")

    def clips(self, request: ClipRequest, key: str = "") -> list[ClipPlan]:
        """The clips `request` cuts out of this sample (see `jobs.inputs.sampling.plan_clips`)."""
        return plan_clips(self.source, request, key)

    def whole_pixels(self, plan: ClipPlan, resize: ResizeMode = "exact") -> bool:
        """Whether the clip's pixels are whole numbers before their scaling to [-1, 1], so that
        they can travel as uint8: always after FFmpeg's scaler ("decoder"); with the "exact"
        resize only where the frames need none (their size already covers the clip's exactly)."""
        if resize == "decoder":
            return True
        h, w = self.info.height, self.info.width
        return cover_size(h, w, plan.height, plan.width) == (h, w)

    def decode(self, plan: ClipPlan, out: Tensor | None = None, resize: ResizeMode = "exact") -> Tensor:
        """The clip's pixels, C T H W float32 in [-1, 1] (written into `out` when given); into a
        uint8 `out`, the same pixels as uint8 in [0, 255] (`signed_unit` makes them the float ones),
        which only a clip of `whole_pixels` can give.

        `resize` "exact" converts each frame to float at its full size and resizes it as Open-Sora
        does (12 bytes per source pixel, briefly); "decoder" has FFmpeg's scaler bring it to the
        cover size in uint8 first (memory bounded by the clip; bilinear, but not the same numbers).

        Raises:
            FrameSizeChanged: Into uint8, a frame that needs a float resize (one whose size
                differs from the first frame's).
        """
        if out is None:
            out = torch.empty(3, plan.num_frames, plan.height, plan.width)
        try:
            return self._decode(plan, out, resize)
        except _TimestampsOutOfOrder:
            # (an AVI with B-frames: FFmpeg makes its timestamps up, and they come out of order) the
            # frames are taken in the order the decoder gives them, as Open-Sora's reader takes them
            self.timed = False
            return self._decode(plan, out, resize)

    def _decode(self, plan: ClipPlan, out: Tensor, resize: ResizeMode) -> Tensor:
        whole = out.dtype == torch.uint8
        for i, frame in enumerate(self._frames(plan.frames)):
            if resize == "decoder":
                pixels = _scaled_by_decoder(frame, plan.height, plan.width)
                out[:, i] = pixels if whole else pixels.float().div_(255.0)
                continue
            rgb = torch.from_numpy(np.ascontiguousarray(_displayed(frame))).permute(2, 0, 1)
            if not whole:
                out[:, i] = resize_crop(rgb[None], plan.height, plan.width)[0]
            elif cover_size(*rgb.shape[1:], plan.height, plan.width) == tuple(rgb.shape[1:]):
                out[:, i] = center_crop(rgb, plan.height, plan.width)
            else:
                raise FrameSizeChanged(
                    f"frame of {rgb.shape[2]}x{rgb.shape[1]} in a clip planned at {self.info.width}x{self.info.height}"
                )
        return out if whole else out.mul_(2.0).sub_(1.0)

    def _frames(self, wanted: tuple[int, ...]) -> Iterator[av.VideoFrame]:
        """The frames on display at grid frames `wanted` (ascending), one per index."""
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        timed = self.timed and period > 0

        def deadline(i: int) -> float:  # grid frame i is the last frame to start by this time (seconds)
            return self.t0 + (i + self.slack) * period

        decoded, j, previous, latest = 0, 0, None, -math.inf
        with _ffmpeg_log() as log, self._opened() as container:
            stream = container.streams.video[0]
            if timed and wanted[0] > 0 and self.time_base > 0:
                target = self.t0 + wanted[0] * period
                container.seek(int(target / self.time_base), stream=stream, backward=True, any_frame=False)
            try:
                for frame in container.decode(stream):
                    decoded += 1
                    self.frames_decoded += 1
                    self._check_time(decoded)
                    self._check_frame(frame)
                    if self.limits.max_frames is not None and decoded > self.limits.max_frames:
                        raise VideoError(f"over {self.limits.max_frames} frames decoded (limits.max_frames)")
                    if timed:
                        t = float(frame.pts * self.time_base) if frame.pts is not None else math.nan
                        if math.isnan(t):
                            raise VideoError("a decoded frame has no timestamp")
                        if t < latest:
                            raise _TimestampsOutOfOrder
                        latest = t
                        while j < len(wanted) and t > deadline(wanted[j]):
                            yield previous if previous is not None else frame
                            j += 1
                    else:
                        while j < len(wanted) and wanted[j] == decoded - 1:
                            yield frame
                            j += 1
                    if j == len(wanted):
                        break
                    previous = frame
            except VideoError:
                raise
            except (av.FFmpegError, ValueError) as e:
                raise VideoError(f"decoding failed after {decoded} frames: {describe_error(e)}") from e
            _raise_on_damage(log, f"decoding {decoded} frames")
        if j == len(wanted):
            return
        # The end of the stream: the last frame stays on display for one period.
        while j < len(wanted) and previous is not None and timed:
            last = float(previous.pts * self.time_base)
            if deadline(wanted[j]) - last > period + 2 * self.slack * period:
                break
            yield previous
            j += 1
        if j < len(wanted):
            raise VideoError(
                f"decoded frames end before frame {wanted[j]} of {self.source.num_frames} that the container "
                f"holds ({decoded} frames decoded): a corrupt or truncated video"
            )


@contextmanager
def _ffmpeg_log() -> Iterator[list[tuple[int, str, str]]]:
    """FFmpeg's warnings and errors while the block runs, from every thread (PyAV drops them unless
    a level is set; the old level comes back after)."""
    old = av.logging.get_level()
    av.logging.set_level(av.logging.WARNING)
    try:
        with av.logging.Capture(local=False) as log:
            yield log
    finally:
        av.logging.set_level(old)


def _drain(stream: av.video.stream.VideoStream) -> None:
    """Takes what FFmpeg's frame threads still decode before their codec is freed. Freeing it joins
    them while it holds the GIL, and a thread that logs a warning meanwhile waits in PyAV's log
    callback for the GIL: the two would wait for ever (PyAV-Org/PyAV#751, #909). Draining releases
    the GIL while the threads finish."""
    if stream.codec_context.thread_count == 1:
        return  # no frame threads
    try:
        for _ in stream.codec_context.decode(None):
            pass
    except (av.FFmpegError, ValueError):
        pass  # what it says was said while decoding; the frames are not needed


def _raise_on_damage(log: list[tuple[int, str, str]], doing: str) -> None:
    for level, name, message in log:
        if level <= av.logging.ERROR or any(w in message.lower() for w in _DAMAGE_WARNINGS):
            raise VideoError(f"damaged video: FFmpeg said '{message.strip()}' ({name}) while {doing}")


def _scaled_by_decoder(frame: av.VideoFrame, height: int, width: int) -> Tensor:
    """FFmpeg's bilinear scaler to the size that covers `height x width` (as displayed), then the
    display rotation and the centre crop: uint8 C H W."""
    turns = round(frame.rotation / 90) % 4
    shown = (frame.width, frame.height) if turns % 2 else (frame.height, frame.width)  # displayed H, W
    cover_h, cover_w = cover_size(shown[0], shown[1], height, width)
    stored_w, stored_h = (cover_h, cover_w) if turns % 2 else (cover_w, cover_h)
    rgb = frame.reformat(width=stored_w, height=stored_h, format="rgb24", interpolation="BILINEAR").to_ndarray()
    if turns:
        rgb = np.rot90(rgb, k=turns)
    top, left = (cover_h - height) // 2, (cover_w - width) // 2
    crop = np.ascontiguousarray(rgb[top : top + height, left : left + width])
    return torch.from_numpy(crop).permute(2, 0, 1)


def _displayed(frame: av.VideoFrame) -> np.ndarray:
    """The frame as RGB, turned the way its display matrix says (a phone's portrait video stands up)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round(frame.rotation / 90) % 4
    return np.rot90(rgb, k=turns) if turns else rgb


def read_clips(data: bytes, request: ClipRequest, key: str = "", limits: DecodeLimits = DecodeLimits()) -> list[Clip]:
    """Every clip `request` cuts out of an encoded sample (in-process; the job decodes in `DecodePool`)."""
    video = VideoFile(data, limits)
    return [Clip(video.decode(plan, resize=request.resize), video.info, plan) for plan in video.clips(request, key)]


def read_clip(
    data: bytes,
    num_frames: int,
    height: int,
    width: int,
    threads: int = 1,
    max_pixels: int | None = None,
    timeout: float | None = None,
) -> Clip:
    """The first `num_frames` frames of an encoded video, resized to cover `height x width` and cropped.

    Raises:
        VideoError: Not a supported container, no video stream, frames over `max_pixels`,
            undecodable, slower than `timeout`, or fewer than `num_frames` frames.
    """
    limits = DecodeLimits(max_pixels=max_pixels, timeout=timeout, threads=threads)
    return read_clips(data, ClipRequest(num_frames, height, width), limits=limits)[0]


def read_frames(data: bytes, frames: list[int], height: int, width: int, resize: ResizeMode = "exact") -> Tensor:
    """The grid frames a row records (`frame_indices`), shaped as the job shaped them."""
    video = VideoFile(data)
    plan = ClipPlan(0, tuple(frames), 1, height, width)
    return video.decode(plan, resize=resize)


def cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The size an `h x w` frame is resized to so that it covers `height x width` (Open-Sora's rounding)."""
    scale_h, scale_w = height / h, width / w
    if scale_h > scale_w:  # height is the tight side; width overflows and is cropped
        return height, round(w * scale_h)
    return round(h * scale_w), width


def resize_crop(frames: Tensor, height: int, width: int) -> Tensor:
    """Resizes uint8 `N C H W` frames to cover `height x width`, then crops the centre.

    Returns float32 in [0, 1], like Open-Sora's `ToTensorVideo` followed by `ResizeCrop`.
    """
    x = frames.float().div_(255.0)
    h, w = x.shape[-2:]
    size = cover_size(h, w, height, width)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return center_crop(x, height, width)


def center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """The centre `height x width` of `... H W` (Open-Sora's rounding: the extra row or column
    goes to the bottom or right)."""
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]
