"""Peak memory, time and accuracy of tiled and chunked VAE encodes, against the untiled encode.

    OMP_NUM_THREADS=2 python benchmarks/vae_memory.py              # CPU: the tiny presets
    python benchmarks/vae_memory.py --device cuda                   # GPU: the full presets, bf16

For each family and input shape it runs the untiled encode and a set of plans ("opensora" mode,
exact chunks with each GroupNorm choice, "auto" under budgets of 1/2 and 1/8 of the untiled
estimate of the preset's shorter clip, the same budgets for the clip twice as long) and
prints: the plan, the measured peak (CUDA: `max_memory_allocated`; CPU: the allocator events
of `torch.profiler`), the estimate `auto` plans with (before calibration) and
measured/estimate, the time, and the max abs difference of the posterior mean (the DC-AE's
latent) from the untiled one, next to the largest |value| of the untiled latent.

Weights are random (seeded) unless `--checkpoint-dir` holds the presets' checkpoint files, so
the differences show what tiling does to a network, not to a trained one; see
benchmarks/causal_norm_stats.py for the GroupNorm comparison on a briefly fitted model.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vae import DiagonalGaussianDistribution, VAEPreset, get_preset, load_vae
from vae.codec import encode_video, estimate_bytes, plan_encode
from vae.memory import calibrated, measure_peak_bytes
from vae.spec import TilePlan, TilingConfig

# (preset, input shapes B C T H W) per device: the same frame at two clip lengths, so that the
# auto rows (whose budgets are fixed per preset from the first shape) show the peak staying put
# while the untiled peak doubles. CPU shapes suit two cores; GPU shapes are what the job stores
# (the untiled run must still fit, for the comparison).
CASES = {
    "cpu": [
        ("flux-ae-tiny", [(1, 3, 8, 128, 128), (1, 3, 16, 128, 128)]),
        ("hunyuan-vae-tiny", [(1, 3, 65, 64, 64), (1, 3, 129, 64, 64)]),
        ("dc-ae-tiny", [(1, 3, 32, 128, 128), (1, 3, 64, 128, 128)]),
    ],
    "cuda": [
        ("flux-ae", [(1, 3, 16, 512, 512), (1, 3, 32, 512, 512)]),
        ("hunyuan-vae", [(1, 3, 33, 512, 512), (1, 3, 65, 512, 512)]),
        ("dc-ae-f32t4c128", [(1, 3, 32, 512, 512), (1, 3, 64, 512, 512)]),
    ],
}


@dataclass
class Row:
    preset: str
    shape: tuple[int, ...]
    plan: str
    peak: int
    estimate: int
    seconds: float
    diff: float
    scale: float


def _plans(preset: VAEPreset, shape: tuple[int, ...], budgets: list[int], device: str) -> list[tuple[str, TilePlan]]:
    """Exact chunks where the family has them, then "auto" under each budget."""
    plans: list[tuple[str, TilePlan]] = []
    if preset.family.stream_kv_channels is not None:  # a streaming encoder: chunks and its norm choices
        k = 8  # latent frames per chunk (32 frames; the first chunk 33)
        plans += [(f"chunks {k}, norm {n}", TilePlan("chunks", k, norm=n)) for n in ("causal", "chunk")]
        plans.append((f"chunks {k}, norm clip x2", TilePlan("chunks", k, norm="clip", norm_passes=2)))
    elif preset.family.temporal_split == "chunks":  # independent frames
        plans.append(("chunks of 4 frames", TilePlan("chunks", 4)))
    for budget in budgets:
        plan = plan_encode(preset, shape, config=TilingConfig("auto", memory_budget=budget), device=device)
        fits = "" if plan.fits else " (nothing fits: the cheapest tried)"
        plans.append((f"auto {budget / 2**20:.0f} MiB: {plan.describe()}{fits}", plan))
    return plans


def run(device: str, dtype: torch.dtype, checkpoint_dir: Path | None) -> list[Row]:
    rows = []
    for name, shapes in CASES[device]:
        preset = get_preset(name)
        checkpoint = checkpoint_dir / preset.checkpoint if checkpoint_dir and preset.checkpoint else None
        model = load_vae(preset, checkpoint, device=device, dtype=dtype)
        untiled = calibrated(estimate_bytes(preset, shapes[0], dtype, device=device), device)
        budgets = [untiled // 2, untiled // 8]  # fixed per preset: the longer clip gets the same
        for shape in shapes:
            rows += _case(model, preset, shape, budgets, device, dtype)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _case(
    model: torch.nn.Module,
    preset: VAEPreset,
    shape: tuple[int, ...],
    budgets: list[int],
    device: str,
    dtype: torch.dtype,
) -> list[Row]:
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device, dtype)
    opensora = plan_encode(preset, shape, dtype, TilingConfig("opensora"))
    plans = [("untiled", TilePlan()), (f"opensora: {opensora.describe()}", opensora)]
    plans += _plans(preset, shape, budgets, device)
    rows: list[Row] = []
    reference = None
    for label, plan in plans:

        def encode(plan: TilePlan = plan) -> tuple[torch.Tensor, DiagonalGaussianDistribution | None]:
            return encode_video(model, preset, x, sample=False, tiling=plan)

        # Timed without the profiler (which slows small ops down on CPU), then measured.
        start = time.perf_counter()
        encode()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        (latent, posterior), peak = measure_peak_bytes(encode, device)
        mean = (latent if posterior is None else posterior.mean).float()
        reference = mean if reference is None else reference
        estimate = estimate_bytes(preset, shape, dtype, plan, device=device)
        diff = (mean - reference).abs().max().item()
        rows.append(Row(preset.name, shape, label, peak, estimate, seconds, diff, reference.abs().max().item()))
        print(_format(rows[-1]), flush=True)
    return rows


def _format(row: Row) -> str:
    shape = "x".join(str(s) for s in row.shape[2:])
    return (
        f"{row.preset:17s} {shape:12s} {row.plan:100s} {row.peak / 2**20:9.1f} MiB {row.estimate / 2**20:9.1f} MiB "
        f"{row.peak / max(row.estimate, 1):5.2f} {row.seconds:7.2f}s {row.diff:10.3g} {row.scale:8.3g}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="folder with the presets' checkpoints")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    print(
        f"{'preset':17s} {'T x H x W':12s} {'plan':100s} {'peak':>13s} {'estimate':>13s} {'ratio':>5s} "
        f"{'time':>8s} {'max|diff|':>10s} {'max|ref|':>8s}"
    )
    with torch.inference_mode():
        run(args.device, dtype, args.checkpoint_dir)


if __name__ == "__main__":
    main()
