"""Peak memory and time of decoding large frames with each `video.resize` mode.

    python benchmarks/decode_memory.py                      # 7680x4320 (8K), 2 frames, to 256x256
    python benchmarks/decode_memory.py --size 3840x2160 --frames 4

Each mode runs in a fresh process, its peak resident memory above what it held before decoding
(VmHWM, reset first; Linux only): `exact` converts every frame to
float at its full size before Open-Sora's resize (12 bytes per source pixel while it is resized),
`decoder` has FFmpeg's scaler bring it to the cover size in uint8 first. Prints one JSON line per
mode and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, RssAnon, ...; Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure(path: str, mode: str, frames: int) -> dict[str, float | str]:
    from jobs.inputs.sampling import ClipRequest
    from jobs.inputs.video import read_clips

    data = Path(path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM): it survives fork and exec
    base = status_kb("VmRSS")
    started = time.perf_counter()
    read_clips(data, ClipRequest(num_frames=frames, height=256, width=256, resize=mode))  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    peak = (status_kb("VmHWM") - base) / 1024
    return {"mode": mode, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7680x4320", help="WxH of the synthetic source video")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process
        print(json.dumps(measure(args.measure[0], args.measure[1], args.frames)))
        return
    from jobs.demo_data import synth_video, video_file_bytes

    width, height = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "source.mp4"
        frames = synth_video(np.random.default_rng(0), width, height, args.frames, 24).frames
        path.write_bytes(video_file_bytes(frames, fps=24))
        results = []
        for mode in ("exact", "decoder"):
            cmd = [sys.executable, __file__, "--frames", str(args.frames), "--measure", str(path), mode]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append({"source": args.size, "frames": args.frames, **json.loads(out.strip().splitlines()[-1])})
    for r in results:
        print(json.dumps(r))
    print(f"\n{'mode':<8} {'source':>10} {'frames':>6} {'peak RSS MB':>12} {'seconds':>8}")
    for r in results:
        print(f"{r['mode']:<8} {r['source']:>10} {r['frames']:>6} {r['peak_rss_mb']:>12} {r['seconds']:>8}")


if __name__ == "__main__":
    main()
