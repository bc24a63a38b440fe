"""Train the tiny FLUX AE on synthetic demo videos: the weights behind `configs/demo-vae.safetensors`.

    OMP_NUM_THREADS=1 python -m jobs.train_demo_vae --output configs/demo-vae.safetensors

The demo's reconstructions should be pictures, not the noise a random decoder makes, so the
`flux-ae-tiny` preset is trained for a few minutes on one CPU core. Training videos come from
`jobs.demo_data` with seed 1; the demo dataset (`make demo`) and the tests use seed 0, so
what they measure was never seen in training. Each step draws fresh videos (no epochs, no
overfitting), decodes them with the job's own `read_clip` at the demo's 128x128, and trains
on random crops of single frames: the model is frame-by-frame, and small crops give more
variety per second of CPU. Loss: L1 + L2 on pixels plus a small KL term on the posterior,
scaled as in the latent-diffusion VAEs (KL summed over the latent, per pixel, weight 1e-6).
A short run needs two things a long one can do without: an initialisation under which the
output depends on the input from the first step (`init_for_a_short_run`) and a modest Adam
learning rate (1e-4; at 1e-3 the 3x3 convs over 128 channels take steps far too large).
Everything is seeded (init, videos, crops, posterior noise). The committed file took 15 minutes
of one core (1,800 steps) and scores ~30 dB PSNR on the held-out demo videos. The weights
are stored in float16 (7.9 MB); `vae.load_vae` casts them to the compute dtype.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from jobs.demo_data import demo_sample
from jobs.inputs.video import read_clip
from jobs.quality.metrics import psnr
from vae import get_preset, load_vae
from vae.autoencoder_2d import AttnBlock, ResnetBlock

PRESET = "flux-ae-tiny"
DATA_SEED = 1  # the demo dataset uses seed 0: keep it held out
FRAMES = 16  # frames decoded per video (the demo job encodes the first 16)
SIZE = 128  # the demo job's height and width
INITIAL_LOGVAR = -6.0
EVAL_OFFSET = 10**6  # training-seed video indices used for the progress numbers, never trained on


def video_frames(index: int) -> Tensor:
    """Frames `T 3 H W` in [-1, 1] of training video `index`, decoded exactly as the job does."""
    members = demo_sample(DATA_SEED, index, min_frames=FRAMES, max_frames=FRAMES)
    return read_clip(members["mp4"], FRAMES, SIZE, SIZE).pixels.transpose(0, 1)


def train_batch(step: int, videos: int, frames_per_video: int, crop: int, rng: np.random.Generator) -> Tensor:
    """`videos * frames_per_video` random crops of random frames, as one-frame clips `N 3 1 crop crop`."""
    crops = []
    for v in range(videos):
        frames = video_frames(step * videos + v)
        for t in rng.choice(FRAMES, size=frames_per_video, replace=False):
            top, left = rng.integers(0, SIZE - crop + 1, size=2)
            crops.append(frames[t, :, top : top + crop, left : left + crop])
    return torch.stack(crops)[:, :, None]


@torch.no_grad()
def init_for_a_short_run(model: nn.Module, z_channels: int) -> None:
    """An initialisation that learns in minutes instead of hours.

    PyTorch's default conv init shrinks the signal at every layer, so after a dozen convs the
    output hardly depends on the input. Instead: variance-preserving conv weights, residual
    branches (and attention outputs) that start at zero so that every block begins as the
    identity, and a nearly deterministic posterior (std ~0.05 instead of ~1).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="linear")  # biases keep their default
    for module in model.modules():
        if isinstance(module, (ResnetBlock, AttnBlock)):
            last = module.conv2 if isinstance(module, ResnetBlock) else module.proj_out
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
    model.encoder.conv_out.bias[z_channels:].fill_(INITIAL_LOGVAR)


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def eval_set(videos: int = 6, frames: int = 4) -> Tensor:
    """A few held-out clips `N 3 T H W` (training seed, far-away indices) for the progress numbers."""
    return torch.stack([video_frames(EVAL_OFFSET + i)[:frames].transpose(0, 1) for i in range(videos)])


@torch.no_grad()
def evaluate(model: nn.Module, clips: Tensor) -> float:
    """Mean PSNR (dB) of full 128x128 frames through encode (posterior sample) and decode."""
    generator = torch.Generator().manual_seed(0)
    scores = []
    for clip in clips:  # C T H W
        z, _ = model.encode(clip[None], sample=True, generator=generator)
        recon = model.decode(z)[0].clamp(-1, 1)
        scores.append(psnr((recon + 1) / 2, (clip + 1) / 2))
    return float(np.mean(scores))


def train(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    preset = get_preset(PRESET)
    model = preset.build().train()
    init_for_a_short_run(model, preset.params.z_channels)
    print(f"{PRESET}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    eval_clips = eval_set()
    start = time.monotonic()
    for step in range(args.steps):
        x = train_batch(step, args.videos, args.frames_per_video, args.crop, rng)
        z, posterior = model.encode(x, sample=True)
        recon = model.decode(z)
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl_loss = posterior.kl().mean() / x[0].numel()  # per input pixel
        loss = rec_loss + args.kl_weight * kl_loss
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(
                f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  rec {rec_loss.item():.4f}  "
                f"kl {kl_loss.item():.2f}  eval PSNR {evaluate(model, eval_clips):.2f} dB  "
                f"{time.monotonic() - start:.0f}s",
                flush=True,
            )
    return model.eval()


def save(model: nn.Module, path: Path, args: argparse.Namespace) -> None:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    metadata = {"preset": PRESET, "data_seed": str(DATA_SEED), **{k: str(v) for k, v in vars(args).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata=metadata)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("configs/demo-vae.safetensors"))
    p.add_argument("--steps", type=int, default=1800)  # ~14 minutes on one free core
    p.add_argument("--videos", type=int, default=4, help="fresh videos per step")
    p.add_argument("--frames-per-video", type=int, default=2)
    p.add_argument("--crop", type=int, default=64, help="square crop side (a multiple of 8)")
    p.add_argument("--lr", type=float, default=1e-4)  # Adam; 3e-4 is already slower, 1e-3 stalls
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0, help="model init, crops and posterior noise")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    model = train(args)
    save(model, args.output, args)
    # Check what was written: reload through the job's loader (float16 -> float32).
    reloaded = load_vae(PRESET, args.output)
    print(
        f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - started:.0f}s; "
        f"eval PSNR after reload {evaluate(reloaded, eval_set()):.2f} dB"
    )


if __name__ == "__main__":
    main()
