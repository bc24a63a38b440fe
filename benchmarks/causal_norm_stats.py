"""How far each way of splitting the causal 3D VAE in time lands from the untiled encode.

    OMP_NUM_THREADS=2 python benchmarks/causal_norm_stats.py              # ~25 min on 2 busy CPU cores
    python benchmarks/causal_norm_stats.py --checkpoint hunyuan_vae.safetensors --size 256   # real weights, GPU

The HunyuanVideo VAE normalises over all frames of a clip, so no split in time is exact. This
compares, on the same long clip, the untiled posterior mean with:

- Open-Sora's temporal tiles (64+1 frames, stride 48, 4 latent frames blended) and the 16+1
  tiles that diffusers uses by default (same rule, smaller tiles);
- exact streaming chunks (`vae/causal_3d_stream.py`) with each GroupNorm choice: "causal"
  (running statistics; the same for every chunk size), "chunk" (each chunk's own), and "clip"
  (refined over extra passes);
- for scale, Open-Sora's spatial tiles (tiles of half the frame) over the whole clip, which is
  how Open-Sora's training config runs this VAE on frames larger than 256 px.

Random weights make GroupNorm statistics meaningless (the latents of an untrained network are
dominated by whatever the normalisation does), so by default a narrow model of the released
depth is first fitted for `--steps` steps as a plain autoencoder on 48x48 synthetic clips:
smooth gradients drifting in colour with moving blobs, half of them with a scene cut (400
steps only start to shape it: its reconstructions are still poor). The test clip is 129
frames (Open-Sora's default length) at 128x128 with one cut. Numbers are the max and mean abs
difference of the posterior mean, also relative to the std of the untiled mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from vae import VAEPreset, get_preset, load_vae
from vae.causal_3d import AutoencoderKLCausal3D, Causal3DParams
from vae.codec import encode_video
from vae.spec import TilePlan


def synthetic_video(batch: int, frames: int, size: int, seed: int, cut: int | None = None) -> torch.Tensor:
    """`B 3 T size size` in [-1, 1]: a drifting two-colour gradient with three moving blobs; a new scene at `cut`."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")

    def scene() -> tuple:
        angle = torch.rand(1, generator=g) * 2 * math.pi
        colors = torch.rand(2, 3, 1, 1, generator=g) * 2 - 1
        drift = (torch.rand(3, 1, 1, generator=g) - 0.5) * 0.04
        blobs = []
        for _ in range(3):  # position, velocity per frame, radius
            pos, vel = torch.rand(2, generator=g), (torch.rand(2, generator=g) - 0.5) * 0.03
            blobs.append((pos, vel, 0.05 + 0.15 * torch.rand(1, generator=g).item()))
        return angle, colors, drift, blobs, torch.rand(3, 3, 1, 1, generator=g) * 2 - 1

    out = torch.empty(batch, 3, frames, size, size)
    for b in range(batch):
        angle, colors, drift, blobs, blob_colors = scene()
        for f in range(frames):
            if f == cut:
                angle, colors, drift, blobs, blob_colors = scene()
            ramp = (torch.cos(angle) * xs + torch.sin(angle) * ys + 1) / 2
            frame = colors[0] * (1 - ramp) + colors[1] * ramp + drift * f
            for (pos, vel, radius), color in zip(blobs, blob_colors):
                cy, cx = (pos + vel * f) % 1.0
                mask = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
                frame = frame * (1 - mask) + color * mask
            out[b, :, f] = frame
    return out.clamp(-1, 1)


def fit(model: AutoencoderKLCausal3D, steps: int, size: int) -> None:
    """A few hundred steps of L1 reconstruction (through the posterior mean) on 17-frame clips."""
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    start, device = time.perf_counter(), next(model.parameters()).device
    for step in range(steps):
        x = synthetic_video(2, 17, size, seed=1000 + step, cut=None if step % 2 else 9).to(device)
        loss = (model.decoder(model.post_quant_conv(model.posterior(x).mode())) - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"fit step {step}: L1 {loss.item():.4f} ({time.perf_counter() - start:.0f}s)", flush=True)


def compare(model: AutoencoderKLCausal3D, preset: VAEPreset, x: torch.Tensor, chunk: int) -> None:
    reference = encode_video(model, preset, x, sample=False)[1].mean
    tile = x.shape[-1] // 2 // 32 * 32  # half the frame, a size Open-Sora's rule tiles evenly
    scale = reference.std().item()
    print(f"untiled posterior mean: std {scale:.4f}, max |.| {reference.abs().max().item():.4f}")
    plans = [
        ("Open-Sora temporal tiles 64+1", TilePlan("tiles", 64)),
        ("diffusers-size temporal tiles 16+1", TilePlan("tiles", 16)),
        *[(f"chunks of {k}, norm causal", TilePlan("chunks", k, norm="causal")) for k in (chunk, 2 * chunk)],
        *[(f"chunks of {k}, norm chunk", TilePlan("chunks", k, norm="chunk")) for k in (chunk, 2 * chunk)],
        *[
            (f"chunks of {chunk}, norm clip x{p}", TilePlan("chunks", chunk, norm="clip", norm_passes=p))
            for p in (2, 3)
        ],
        *([(f"Open-Sora spatial tiles {tile}px, whole clip", TilePlan(spatial_tile=tile))] if tile else []),
    ]
    print(f"{'split':38s} {'max|diff|':>10s} {'/std':>7s} {'mean|diff|':>11s} {'/std':>7s} {'time':>7s}")
    for label, plan in plans:
        start = time.perf_counter()
        mean = encode_video(model, preset, x, sample=False, tiling=plan)[1].mean
        d = (mean - reference).abs()
        print(
            f"{label:38s} {d.max().item():10.4f} {d.max().item() / scale:7.3f} {d.mean().item():11.5f} "
            f"{d.mean().item() / scale:7.3f} {time.perf_counter() - start:6.1f}s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="fit steps before comparing (0: random weights)")
    parser.add_argument("--widths", default="16,32,64,64", help="block_out_channels (released: 128,256,512,512)")
    parser.add_argument("--groups", type=int, default=8, help="norm_num_groups (released: 32)")
    parser.add_argument("--fit-size", type=int, default=48, help="height and width of the fitting clips")
    parser.add_argument("--size", type=int, default=128, help="height and width of the test clip")
    parser.add_argument("--frames", type=int, default=129, help="frames of the test clip (1+4k)")
    parser.add_argument("--chunk", type=int, default=4, help="latent frames per chunk")
    parser.add_argument("--checkpoint", default=None, help="hunyuan_vae.safetensors: the released model instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.checkpoint:
        preset = get_preset("hunyuan-vae")
        model = load_vae(preset, args.checkpoint, device=device)
    else:
        params = Causal3DParams(
            block_out_channels=tuple(int(w) for w in args.widths.split(",")), norm_num_groups=args.groups
        )
        model = AutoencoderKLCausal3D(params).to(device)
        fit(model, args.steps, args.fit_size)
        model.eval().requires_grad_(False)
        preset = dataclasses.replace(get_preset("hunyuan-vae"), name="hunyuan-vae-bench", params=params, checkpoint="")
    x = synthetic_video(1, args.frames, args.size, seed=7, cut=args.frames // 2).to(device)
    compare(model, preset, x, args.chunk)


if __name__ == "__main__":
    main()
