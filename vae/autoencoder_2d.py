"""The FLUX autoencoder, used by Open-Sora v2 as its 2D (frame-by-frame) video VAE.

Architecture facts come from FLUX's `autoencoder.py` and Open-Sora's `autoencoder_2d.py`;
parameter names and shapes match the public `ae.safetensors` (= Open-Sora's
`flux1-dev-ae.safetensors`), so that file loads with strict key checking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vae.posterior import DiagonalGaussianDistribution


@dataclass(frozen=True)
class AutoEncoder2DParams:
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    # GroupNorm groups. FLUX uses 32, i.e. 4 channels per group at its narrowest level (128).
    # A narrower model needs fewer groups to keep that: with one channel per group the norm
    # before `conv_out` removes each frame's mean colour, which the decoder cannot get back.
    norm_groups: int = 32


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        y = self.norm(x)
        q, k, v = (rearrange(proj(y), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(y)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Only blocks that change width have a shortcut projection (and a checkpoint key).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks) and an optional down/upsampler."""

    def __init__(self, blocks: Sequence[nn.Module], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(name, resample)


class Encoder(nn.Module):
    """`B 3 H W` in [-1, 1] -> `B 2*z_channels H/f W/f` (posterior mean and log-variance)."""

    def __init__(self, p: AutoEncoder2DParams) -> None:
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width, p.norm_groups))
                block_in = width
            last = level == len(widths) - 1
            self.down.append(_Level(blocks, None if last else Downsample(width), "downsample"))
        self.mid = _MidBlock(block_in, p.norm_groups)
        self.norm_out = _group_norm(block_in, p.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """`B z_channels h w` -> `B 3 h*f w*f`; each level has num_res_blocks + 1 ResnetBlocks."""

    def __init__(self, p: AutoEncoder2DParams) -> None:
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _MidBlock(block_in, p.norm_groups)
        # `up` is indexed by resolution level (0 = full resolution), as in the checkpoint,
        # but runs from the deepest level to level 0.
        levels: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[level], p.norm_groups))
                block_in = widths[level]
            levels.insert(0, _Level(blocks, Upsample(block_in) if level > 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in, p.norm_groups)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder2D(nn.Module):
    """Frame-by-frame video autoencoder: frames are folded into the batch.

    `encode` maps `B C T H W` in [-1, 1] to `scale_factor * (z - shift_factor)` with
    `z` a posterior sample (or its mode); `decode` inverts the scaling and decodes.
    """

    def __init__(self, params: AutoEncoder2DParams) -> None:
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def posterior(self, x: Tensor) -> DiagonalGaussianDistribution:
        """The posterior over unscaled latents, laid out `B C T h w`."""
        t = x.shape[2]
        moments = self.encoder(rearrange(x, "b c t h w -> (b t) c h w"))
        return DiagonalGaussianDistribution(rearrange(moments, "(b t) c h w -> b c t h w", t=t))

    def scale_latent(self, z: Tensor) -> Tensor:
        return self.scale_factor * (z - self.shift_factor)

    def unscale_latent(self, latent: Tensor) -> Tensor:
        return latent / self.scale_factor + self.shift_factor

    def encode(
        self,
        x: Tensor,
        sample: bool = True,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        posterior = self.posterior(x)
        return posterior.latent(self.scale_latent, sample, generator), posterior

    def decode(self, z: Tensor) -> Tensor:
        t = z.shape[2]
        x = self.decoder(rearrange(self.unscale_latent(z), "b c t h w -> (b t) c h w"))
        return rearrange(x, "(b t) c h w -> b c t h w", t=t)
