"""Write a small WebDataset of real H.264 videos with captions, for the demo and the tests.

    python -m jobs.demo_data --output demo/data --shards 4 --samples-per-shard 6

Each sample is `<key>.mp4` plus a caption as `<key>.txt` or `<key>.json` (alternating):
smooth gradients with moving shapes, at a few sizes, lengths and frame rates, encoded with
PyAV. Everything is seeded, so the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

SIZES = [(128, 128), (160, 96), (96, 160), (176, 144), (192, 112)]  # (width, height), even for yuv420p
FRAME_RATES = [24, 25, 30]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "purple": (150, 60, 190),
}


@dataclass
class DemoVideo:
    frames: np.ndarray  # T H W 3 uint8
    fps: int
    caption: str


def synth_video(rng: np.random.Generator, width: int, height: int, num_frames: int, fps: int) -> DemoVideo:
    """A gradient background drifting in colour, with one to three shapes moving across it."""
    names = list(COLORS)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height + 1.0) / 2.0
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    drift = rng.uniform(-1.5, 1.5, size=3).astype(np.float32)
    shapes = []
    for _ in range(rng.integers(1, 4)):
        shapes.append(
            {
                "color": names[rng.integers(len(names))],
                "kind": "circle" if rng.random() < 0.5 else "square",
                "radius": rng.uniform(0.08, 0.2) * min(width, height),
                "pos": rng.uniform(0.2, 0.8, size=2) * (width, height),
                "vel": rng.uniform(-2.5, 2.5, size=2),
            }
        )
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        img = c0 + (c1 - c0 + drift * t) * ramp[..., None]
        for s in shapes:
            x, y = s["pos"] + s["vel"] * t
            if s["kind"] == "circle":
                mask = (xs - x) ** 2 + (ys - y) ** 2 <= s["radius"] ** 2
            else:
                mask = (np.abs(xs - x) <= s["radius"]) & (np.abs(ys - y) <= s["radius"])
            img[mask] = COLORS[s["color"]]
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    described = " and ".join(f"a {s['color']} {s['kind']}" for s in shapes)
    return DemoVideo(frames=frames, fps=fps, caption=f"{described} moving over a soft gradient")


def video_file_bytes(
    frames: np.ndarray, fps: int, codec: str = "libx264", container: str = "mp4", crf: int = 18
) -> bytes:
    """Encodes `T H W 3` uint8 frames into a video file in memory."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # One thread and fixed options so that the bytes are reproducible.
            stream.options = {"crf": str(crf), "preset": "fast", "threads": "1"}
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = t  # explicit timestamps keep the encoder's output reproducible
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def demo_sample(seed: int, index: int, min_frames: int = 20, max_frames: int = 48, scale: int = 1) -> dict[str, bytes]:
    """The members of demo sample `index` (without key): mp4 plus `txt` or `json`; `scale` multiplies
    the frame size (6: about 720p, 10: about 1080p, for benchmarks that decode real-sized sources)."""
    rng = np.random.default_rng([seed, index])
    width, height = (scale * n for n in SIZES[rng.integers(len(SIZES))])
    num_frames = int(rng.integers(min_frames, max_frames + 1))
    fps = FRAME_RATES[rng.integers(len(FRAME_RATES))]
    video = synth_video(rng, width, height, num_frames, fps)
    members = {"mp4": video_file_bytes(video.frames, fps)}
    if index % 2 == 0:
        members["txt"] = video.caption.encode()
    else:
        members["json"] = json.dumps({"caption": video.caption, "fps": fps, "frames": num_frames}).encode()
    return members


def write_shard(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """Writes `(key, {suffix: bytes})` samples as a WebDataset tar with fixed headers."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))


def write_demo_dataset(
    output: str | Path,
    shards: int = 4,
    samples_per_shard: int = 6,
    seed: int = 0,
    min_frames: int = 20,
    scale: int = 1,
    max_frames: int = 48,
) -> list[Path]:
    """Writes `shard-000000.tar` ... into `output` and returns their paths; each video has `min_frames`
    to `max_frames` frames (`scale`: see `demo_sample`)."""
    if min_frames > max_frames:
        raise ValueError(f"min_frames ({min_frames}) is over max_frames ({max_frames})")
    paths = []
    for s in range(shards):
        path = Path(output) / f"shard-{s:06d}.tar"
        indices = range(s * samples_per_shard, (s + 1) * samples_per_shard)
        write_shard(path, ((f"clip-{i:06d}", demo_sample(seed, i, min_frames, max_frames, scale)) for i in indices))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory for the shards")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples-per-shard", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-frames", type=int, default=20, help="shortest video, in frames")
    parser.add_argument("--max-frames", type=int, default=48, help="longest video, in frames")
    args = parser.parse_args(argv)
    try:
        paths = write_demo_dataset(
            args.output, args.shards, args.samples_per_shard, args.seed, args.min_frames, max_frames=args.max_frames
        )
    except ValueError as e:  # frame counts that cannot be
        parser.error(str(e))
    total = args.shards * args.samples_per_shard
    print(f"wrote {total} videos in {len(paths)} shards: {paths[0].parent}/shard-{{000000..{len(paths) - 1:06d}}}.tar")


if __name__ == "__main__":
    main()
