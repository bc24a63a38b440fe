"""The VAE encoder alone: frames/s per preset, shape and technique, with FLOPs, MFU and peak memory.

    OMP_NUM_THREADS=2 python benchmarks/encoder.py                       # CPU: the tiny presets, 256x256
    OMP_NUM_THREADS=2 python benchmarks/encoder.py --sizes 1280x720 --frames 5 --repeat 1
    python benchmarks/encoder.py --device cuda --peak-tflops 989         # GPU: the full presets, bf16
    python benchmarks/encoder.py --presets hunyuan-vae-tiny --sizes 256x256 --frames 9 17 --compile

For each preset, size (`WxH`; rounded down to the preset's size multiple) and frame count (the
largest the preset accepts up to it) it encodes synthetic clips in [-1, 1] with random weights
(the speed of a trained checkpoint is the same) and prints one JSON line per run and a table:

- baseline: the whole clip in one call, the job's settings (bf16 on CUDA, float32 on CPU);
- each technique turned off or on against it, on the same input:
    fp32            (CUDA) float32 weights and activations instead of bf16
    channels-last   channels-last weights and input (`run.channels_last`)
    math-attention  the mid block's attention without the fused kernel (SDPA's math backend)
    compile         `torch.compile` of the model (`--compile`: compiling takes a while)
    exact-chunks    the chunked encode the job uses when a clip does not fit, about a quarter
                    of the clip at a time: FLUX frames (exact), causal streaming (exact but for
                    the GroupNorm statistics, `vae/causal_3d_stream.py`; no overlap computed twice)
    opensora-tiles  Open-Sora's overlapping tiles instead (what its own pipeline runs)
    diffusers       (causal 3D VAE) diffusers' `AutoencoderKLHunyuanVideo`, its default settings,
                    the same weights: the implementation trainers would otherwise use

FLOPs are counted once per shape with `torch.utils.flop_counter` on the baseline call; achieved
TFLOP/s is that count over the measured time (a chunked or tiled run does the same useful work,
tiles add the overlap on top), and MFU is that over `--peak-tflops`. Peak memory is what the call
allocates above the weights and its input: CUDA's allocator statistics, on CPU `torch.profiler`'s
allocator events (`vae.memory.measure_peak_bytes`). The process keeps freed host memory for reuse,
as the job's actors do (`run.reuse_host_memory`). `--readme FILE` rewrites the table between
`<!-- encoder:begin -->` and `<!-- encoder:end -->` in FILE (`--block NAME`: another such table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler behind the CPU peak, quiet
import torch
from readme_table import hardware, replace_block
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jobs.orchestration.host_memory import reuse_freed_memory
from vae import VAEPreset, channels_last, channels_last_input, encode_video, get_preset, load_vae
from vae.causal_3d import diffusers_kwargs
from vae.memory import measure_peak_bytes
from vae.spec import TilePlan
from vae.tiling import opensora_plan

PRESETS = {
    "cpu": ["flux-ae-tiny", "hunyuan-vae-tiny", "dc-ae-tiny"],
    "cuda": ["hunyuan-vae", "flux-ae", "dc-ae-f32t4c128"],
}
SIZES = {"cpu": ["256x256"], "cuda": ["256x256", "1280x720"]}  # CPU 720p: seconds per frame, ask for it
FRAMES = {"cpu": [5, 9], "cuda": [33, 65, 129]}
BATCH = {"cpu": 1, "cuda": 1}


@dataclass
class Setup:
    """One way to run the encode: the model, the input and the split, and a context to run it in."""

    model: nn.Module
    x: torch.Tensor
    plan: TilePlan
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    compiled: bool = False  # the whole encode call through `torch.compile`
    call: Callable[[], torch.Tensor] | None = None  # another implementation's encode (scaled latent)
    split: str = ""  # how that one splits the clip, when it is not `plan`


def techniques(device: str, compile_model: bool) -> list[str]:
    names = ["baseline"]
    if device == "cuda":
        names.append("fp32")
    names += ["channels-last", "math-attention"]
    if compile_model:
        names.append("compile")
    return names + ["exact-chunks", "opensora-tiles", "diffusers"]


def build(
    name: str, preset: VAEPreset, shape: tuple[int, ...], device: str, models: dict[str, nn.Module]
) -> Setup | None:
    """The setup of technique `name`, or None where it does not apply to the preset."""
    dtype = torch.float32 if name == "fp32" or device == "cpu" else torch.bfloat16
    key = f"{dtype}"
    if key not in models:
        models[key] = load_vae(preset, None, device=device, dtype=dtype, seed=0)
    model = models[key]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).mul_(2).sub_(1).to(device, dtype)
    if name == "channels-last":  # as the job runs it with `run.channels_last`
        copy = channels_last(load_vae(preset, None, device=device, dtype=dtype, seed=0))
        return Setup(copy, channels_last_input(preset, x), TilePlan())
    if name == "math-attention":
        return Setup(model, x, TilePlan(), lambda: sdpa_kernel([SDPBackend.MATH]))
    if name == "compile":
        return Setup(model, x, TilePlan(), compiled=True)
    if name == "diffusers":
        return diffusers_setup(model, preset, x) if preset.family.name == "causal_3d" else None
    if name == "exact-chunks":
        if preset.family.encode_chunks is None:
            return None
        latent_frames = preset.latent_frames(shape[2])  # four chunks or so, however long the clip
        return Setup(model, x, TilePlan(temporal="chunks", temporal_size=max(1, latent_frames // 4)))
    if name == "opensora-tiles":
        if preset.family.opensora is None:
            return None
        plan = opensora_plan(preset)
        return None if plan.untiled else Setup(model, x, plan)
    return Setup(model, x, TilePlan())


def diffusers_setup(model: nn.Module, preset: VAEPreset, x: torch.Tensor) -> Setup | None:
    """diffusers' `AutoencoderKLHunyuanVideo` with its default settings and the same weights (the
    state dict keys map one to one), its posterior mode scaled as ours."""
    try:
        from diffusers import AutoencoderKLHunyuanVideo
    except ImportError:
        return None
    p = model.params
    ref = AutoencoderKLHunyuanVideo(**diffusers_kwargs(p))
    ref.load_state_dict(model.state_dict(), strict=True)
    ref = ref.to(x.device, x.dtype).eval()

    def call() -> torch.Tensor:
        return (ref.encode(x).latent_dist.mode() - p.shift_factor) * p.scale_factor

    return Setup(ref, x, TilePlan(), call=call, split="its defaults: temporal tiles past 16 frames, no spatial tiles")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(setup: Setup, preset: VAEPreset, device: str, repeat: int) -> tuple[float, int, torch.Tensor]:
    """Seconds per call (after a warm-up call), the peak bytes of one call, and its latent."""
    call = encoder_call(setup, preset)
    with torch.inference_mode(), setup.context():
        latent = call()  # warm-up (and the compile, for `compile`)
        _, peak = measure_peak_bytes(call, device)
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        _sync(device)
    return (time.perf_counter() - started) / repeat, peak, latent


def encoder_call(setup: Setup, preset: VAEPreset) -> Callable[[], torch.Tensor]:
    if setup.call is not None:
        return setup.call

    def call() -> torch.Tensor:
        z, _ = encode_video(setup.model, preset, setup.x, sample=False, tiling=setup.plan)
        return z

    return torch.compile(call, dynamic=False) if setup.compiled else call


def count_flops(model: nn.Module, preset: VAEPreset, x: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encode_video(model, preset, x, sample=False)
    return counter.get_total_flops()


def shapes(preset: VAEPreset, sizes: list[str], frames: list[int], batch: int) -> Iterator[tuple[int, ...]]:
    for size in sizes:
        w, h = (int(v) for v in size.split("x"))
        m = preset.size_multiple
        for t in dict.fromkeys(preset.valid_num_frames(f) for f in frames):
            if t:
                yield (batch, 3, t, h // m * m, w // m * m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="+")
    parser.add_argument("--sizes", nargs="+", help="WxH, e.g. 256x256 1280x720")
    parser.add_argument("--frames", nargs="+", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--repeat", type=int, default=2, help="timed calls per run, after a warm-up call")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--techniques", nargs="+", help="only these (names as in the table)")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense peak (H100/H200 SXM bf16: 989), for MFU")
    parser.add_argument("--readme", type=Path, help="rewrite the encoder table of this Markdown file")
    parser.add_argument("--block", default="encoder", help="which table of --readme (<!-- BLOCK:begin -->)")
    args = parser.parse_args()
    reuse_freed_memory()  # as the job's actors keep freed host memory (`run.reuse_host_memory`)
    device = args.device
    names = args.techniques or techniques(device, args.compile)
    rows = []
    for preset_name in args.presets or PRESETS[device]:
        preset = get_preset(preset_name)
        models: dict[str, nn.Module] = {}
        sizes, frames = args.sizes or SIZES[device], args.frames or FRAMES[device]
        for shape in shapes(preset, sizes, frames, args.batch or BATCH[device]):
            base = build("baseline", preset, shape, device, models)
            assert base is not None
            try:
                flops: int | None = count_flops(base.model, preset, base.x)
            except torch.OutOfMemoryError:  # the whole clip does not fit: no count (the split runs still go)
                flops = None
                torch.cuda.empty_cache()
            reference: torch.Tensor | None = None
            base_seconds = None
            for name in names:
                setup = build(name, preset, shape, device, models)
                if setup is None:
                    continue
                try:
                    seconds, peak, latent = run(setup, preset, device, args.repeat)
                except torch.OutOfMemoryError:  # the row says so; the other runs go on
                    print(json.dumps({"preset": preset_name, "shape": list(shape), "technique": name, "error": "OOM"}))
                    torch.cuda.empty_cache()
                    continue
                if name == "baseline":
                    reference, base_seconds = latent.float(), seconds
                encoded = shape[0] * shape[2]  # frames per call
                row: dict[str, Any] = {
                    "preset": preset_name,
                    "shape": list(shape),
                    "technique": name,
                    "plan": setup.split or setup.plan.describe(),
                    "frames_per_s": round(encoded / seconds, 2),
                    "seconds": round(seconds, 4),
                    "speedup": round(base_seconds / seconds, 3) if base_seconds else None,
                    "tflops": None if flops is None else round(flops / seconds / 1e12, 4),
                    "peak_memory_gb": round(peak / 2**30, 3),
                    "max_abs_diff": None if reference is None else float((latent.float() - reference).abs().max()),
                    "device": device,
                }
                if args.peak_tflops and flops is not None:
                    row["mfu"] = round(flops / seconds / 1e12 / args.peak_tflops, 4)
                print(json.dumps(row), flush=True)
                rows.append(row)
            models.clear()
    print_table(rows, bool(args.peak_tflops))
    if args.readme:
        replace_block(args.readme, args.block, markdown_table(rows, args))
        print(f"rewrote the encoder table of {args.readme}")


def markdown_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The README's block: where and how it ran, then one row per run."""
    command = shlex.join(["python", "benchmarks/encoder.py", *sys.argv[1:]])
    dtype = "bf16" if args.device == "cuda" else "float32"
    lines = [
        f"Hardware: {hardware(args.device)}; torch {torch.__version__}; {dtype}, random weights, batch "
        f"{args.batch or BATCH[args.device]}. Command: `{command}` ({time.strftime('%Y-%m-%d')}).",
        "",
        "| preset | B C T H W | technique | split | frames/s | x baseline | TFLOP/s | MFU | peak GB | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2g}"
        cells = [r["preset"], "x".join(map(str, r["shape"])), r["technique"], r["plan"], r["frames_per_s"]]
        cells += [r["speedup"] or "", r["tflops"] or "", r.get("mfu", "n/a"), r["peak_memory_gb"], diff]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def print_table(rows: list[dict[str, Any]], mfu: bool) -> None:
    head = f"\n{'preset':<18} {'B C T H W':<20} {'technique':<15} {'frames/s':>9} {'x base':>7} {'TFLOP/s':>8}"
    print(head + (f" {'MFU':>6}" if mfu else "") + f" {'peak GB':>8} {'max|diff|':>10}")
    for r in rows:
        line = (
            f"{r['preset']:<18} {'x'.join(map(str, r['shape'])):<20} {r['technique']:<15} {r['frames_per_s']:>9} "
            f"{r['speedup'] or '':>7} {r['tflops'] or '':>8}"
        )
        if mfu:
            line += f" {r.get('mfu', ''):>6}"
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
        print(line + f" {r['peak_memory_gb']:>8} {diff:>10}")


if __name__ == "__main__":
    main()
