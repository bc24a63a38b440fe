"""Peak memory and time of loading a float32 checkpoint in bf16, each way a loader can go.

    python benchmarks/load_memory.py                                  # CPU: flux-ae, hunyuan-vae
    python benchmarks/load_memory.py --device cuda --presets hunyuan-vae dc-ae-f32t4c128

The checkpoint is the preset's random (seeded) weights saved in float32, the dtype the public
checkpoints come in. Each way loads it in a fresh process and reports what the load added:
- `per tensor` (the job's, `vae.load_vae`): tensors read from the file's memory map onto the
  device, each converted to bf16 as it is read;
- `whole file`: every tensor read onto the device in float32, then converted (the device holds
  both whole copies for a moment);
- `host copy`: the file read into host RAM (`safetensors.torch.load` of its bytes, as a loader
  that reads before it places does), then each tensor moved to the device and converted.
Measured: the peak of anonymous host memory (RssAnon, sampled every millisecond: file pages of
the memory map are the page cache, shared by every actor on a node, and not counted), the peak
resident set (VmHWM, file pages included), on CUDA `max_memory_allocated`, and the seconds.
Linux only (/proc). Prints one JSON line per load and a table, beside the bf16 model's size
(the floor).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from decode_memory import status_kb

WAYS = ["per tensor", "whole file", "host copy"]
PRESETS = {"cpu": ["flux-ae", "hunyuan-vae"], "cuda": ["flux-ae", "hunyuan-vae", "dc-ae-f32t4c128"]}
MIB = 2**20


class _PeakAnon:
    """The highest RssAnon seen while it runs, sampled every millisecond by a thread."""

    def __init__(self) -> None:
        self.peak = status_kb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, status_kb("RssAnon"))

    def __enter__(self) -> _PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kb("RssAnon"))


def load(way: str, preset_name: str, checkpoint: str, device: str) -> torch.nn.Module:
    """The model, loaded in bf16 onto `device` the way named."""
    from safetensors.torch import load as load_bytes

    from vae import get_preset, load_vae
    from vae.checkpoint import read_state_dict, strip_prefixes
    from vae.loading import build_with

    preset, dtype = get_preset(preset_name), torch.bfloat16
    if way == "per tensor":
        return load_vae(preset, checkpoint, device=device, dtype=dtype)
    if way == "whole file":
        state = read_state_dict(checkpoint, device=device, prefixes=preset.key_prefixes)
    elif way == "host copy":
        host = load_bytes(Path(checkpoint).read_bytes())
        state = {strip_prefixes(k, preset.key_prefixes): host.pop(k).to(device) for k in list(host)}
    else:
        raise ValueError(f"unknown way {way!r}; one of {WAYS}")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return build_with(preset, state, checkpoint)


def measure(way: str, preset: str, checkpoint: str, device: str) -> dict[str, Any]:
    """Runs in a fresh process: what loading `checkpoint` the way named adds to it."""
    import safetensors.torch  # noqa: F401  (imports before the baseline: they are not the load's)

    import vae.loading  # noqa: F401

    if device == "cuda":
        torch.cuda.init()
        torch.empty(1, device=device)  # the context, before the baseline
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
    anon, rss = status_kb("RssAnon"), status_kb("VmRSS")
    started = time.perf_counter()
    with _PeakAnon() as peak:
        model = load(way, preset, checkpoint, device)
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    result = {
        "preset": preset,
        "way": way,
        "device": device,
        "seconds": round(seconds, 3),
        "model_mib": round(weights / MIB, 1),
        "host_anon_peak_mib": round((peak.peak - anon) / 1024, 1),
        "host_rss_peak_mib": round((status_kb("VmHWM") - rss) / 1024, 1),
    }
    if device == "cuda":
        result["device_peak_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    return result


def write_checkpoint(preset_name: str, path: Path) -> int:
    """The preset's seeded random weights as a float32 safetensors file; returns its size in bytes."""
    from safetensors.torch import save_file

    from vae import load_vae

    model = load_vae(preset_name, None, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="*", help="default: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    parser.add_argument("--ways", nargs="*", default=WAYS, choices=WAYS)
    parser.add_argument("--child", nargs=3, metavar=("WAY", "PRESET", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.device)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets or PRESETS[args.device]:
            checkpoint = Path(tmp) / f"{preset}.safetensors"
            size = write_checkpoint(preset, checkpoint)
            for way in args.ways:
                command = [sys.executable, __file__, "--device", args.device, "--child", way, preset, str(checkpoint)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                row["checkpoint_mib"] = round(size / MIB, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
            checkpoint.unlink()
    cuda = args.device == "cuda"
    header = f"{'preset':<18} {'way':<11} {'fp32 file':>9} {'bf16 model':>10} {'host anon':>9} {'host RSS':>9}"
    print("\n" + header + (f" {'device':>9}" if cuda else "") + f" {'seconds':>8}   (MiB added by the load)")
    for r in rows:
        line = f"{r['preset']:<18} {r['way']:<11} {r['checkpoint_mib']:>9} {r['model_mib']:>10} "
        line += f"{r['host_anon_peak_mib']:>9} {r['host_rss_peak_mib']:>9}"
        print(line + (f" {r['device_peak_mib']:>9}" if cuda else "") + f" {r['seconds']:>8}")


if __name__ == "__main__":
    main()
