"""HunyuanVideo's causal 3D VAE (`AutoencoderKLCausal3D`), Open-Sora v2's `hunyuan_vae`.

Architecture facts come from Open-Sora's `opensora/models/hunyuan_vae` and diffusers'
`AutoencoderKLHunyuanVideo`. Parameter names and shapes match the public
`hunyuan_vae.safetensors` (and the diffusers state dict) one to one, so that file loads with
strict key checking.

Causality: every convolution pads only with past frames, and the mid-block attention lets a
token see only its own and earlier frames. The GroupNorms, however, take their statistics over
all frames of the clip (as in the reference), so a full-clip encoding is not strictly causal:
changing late frames moves the normalisation, and with it the latents of early frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vae.posterior import DiagonalGaussianDistribution

Factors = tuple[int, int, int]  # (T, H, W) resampling factors of one level


@dataclass(frozen=True)
class Causal3DParams:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one level per entry, finest first
    layers_per_block: int = 2  # resnets per encoder level; decoder levels have one more
    norm_num_groups: int = 32
    time_compression_ratio: int = 4  # frames 1+4k -> 1+k latent frames
    spatial_compression_ratio: int = 8
    mid_block_add_attention: bool = True
    scale_factor: float = 0.476986  # HunyuanVideo's released value (latent = scale * (z - shift))
    shift_factor: float = 0.0


def diffusers_kwargs(p: Causal3DParams) -> dict[str, Any]:
    """The arguments of diffusers' `AutoencoderKLHunyuanVideo` for the same network; its state
    dict then has our keys, one to one (the tests and `benchmarks/encoder.py` compare the two)."""
    return {
        "in_channels": p.in_channels,
        "out_channels": p.out_channels,
        "latent_channels": p.latent_channels,
        "block_out_channels": p.block_out_channels,
        "layers_per_block": p.layers_per_block,
        "norm_num_groups": p.norm_num_groups,
        "scaling_factor": p.scale_factor,
        "spatial_compression_ratio": p.spatial_compression_ratio,
        "temporal_compression_ratio": p.time_compression_ratio,
        "mid_block_add_attention": p.mid_block_add_attention,
    }


def level_factors(p: Causal3DParams) -> list[Factors]:
    """The (T, H, W) down/upsampling factor of each level, finest level first.

    As in the reference: the first log2(spatial ratio) levels halve H and W; the
    log2(time ratio) levels just above the deepest one halve T; the deepest level keeps its
    resolution. For the released config: (1,2,2), (2,2,2), (2,2,2), (1,1,1).
    """
    levels = len(p.block_out_channels)
    n_space, n_time = _log2(p.spatial_compression_ratio), _log2(p.time_compression_ratio)
    if p.time_compression_ratio != 4:
        # The reference lays out other ratios differently; no released checkpoint uses them.
        raise ValueError(f"time_compression_ratio must be 4, got {p.time_compression_ratio}")
    if n_space > levels - 1 or n_time > levels - 1:
        raise ValueError(f"{levels} levels cannot give the compression ratios of {p}")
    factors = []
    for i in range(levels):
        space = 2 if i < n_space else 1
        time = 2 if levels - 1 - n_time <= i < levels - 1 else 1
        factors.append((time, space, space))
    return factors


def _log2(ratio: int) -> int:
    n = int(math.log2(ratio)) if ratio >= 1 else -1
    if n < 0 or 2**n != ratio:
        raise ValueError(f"compression ratios must be powers of two, got {ratio}")
    return n


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class CausalConv3d(nn.Module):
    """A 3D convolution that sees only the current and past frames.

    H and W are padded by k//2 on both sides and T by k-1 frames in front, all by replicating
    the border, so output frame t depends on input frames <= t. The temporal padding lives in
    `pad` alone: a chunked encoder can feed the previous chunk's last k-1 frames there instead.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: Factors = (1, 1, 1)) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride)

    def pad(self, x: Tensor) -> Tensor:
        """Pads `B C T H W` for a causal, size-preserving (at stride 1) convolution."""
        k = self.kernel_size
        if k == 1:
            return x
        # The k-1 frames before the clip are copies of its first frame.
        return F.pad(x, (k // 2, k // 2, k // 2, k // 2, k - 1, 0), mode="replicate")

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pad(x))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        # Only blocks that change width have a shortcut projection (and a checkpoint key).
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class DownsampleCausal3D(nn.Module):
    """A strided causal 3x3x3 conv.

    With stride 2 in T and 2 replicated frames in front, T = 1+2m frames become 1+m: the first
    output frame sees only the clip's first frame, output frame j > 0 sees frames 2j-2 .. 2j.
    """

    def __init__(self, channels: int, factors: Factors) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=factors)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UpsampleCausal3D(nn.Module):
    """Nearest-neighbour upsampling, then a causal 3x3x3 conv.

    The clip's first frame is upsampled in H and W only; every later frame is repeated
    `factors[0]` times, so 1+m frames become 1+2m, mirroring the downsampler.
    """

    def __init__(self, channels: int, factors: Factors) -> None:
        super().__init__()
        self.factors = factors
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        # Nearest upsampling by integer factors only repeats values, so upsampling every frame
        # in T too and then dropping the surplus copies of the first frame equals upsampling
        # the first frame spatially and the rest in (T, H, W), as the reference does.
        x = F.interpolate(x, scale_factor=self.factors, mode="nearest")
        return self.conv(x[:, :, self.factors[0] - 1 :])


class CausalAttention(nn.Module):
    """Single-head self-attention over all T*H*W positions of a clip, causal across frames.

    A position attends to every position of its own frame and of earlier frames. Names match
    the checkpoint (diffusers `Attention`): q/k/v are Linear layers, `to_out.0` the output one.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only for the key `to_out.0`

    def forward(self, x: Tensor) -> Tensor:
        _, _, t, h, w = x.shape
        y = rearrange(self.group_norm(x), "b c t h w -> b (t h w) c")
        y = frame_causal_attention(self.to_q(y), self.to_k(y), self.to_v(y), tokens_per_frame=h * w)
        y = rearrange(self.to_out[0](y), "b (t h w) c -> b c t h w", t=t, h=h, w=w)
        return x + y


def frame_causal_attention(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int) -> Tensor:
    """Single-head attention in which a token sees the tokens of its own and earlier frames.

    Equals attention with the reference's block mask (0 where key frame <= query frame, -inf
    elsewhere) but runs frame by frame over growing key prefixes, so no (T*H*W)^2 mask is ever
    built and every call can use a fused kernel. The reference sets `upcast_softmax`, but that
    flag only acts on diffusers' non-SDPA path: it too runs `scaled_dot_product_attention`,
    whose fused kernels accumulate the softmax in fp32 for half inputs.

    Args:
        q: Queries `B N C`, N = T * tokens_per_frame tokens in frame-major order.
        k: Keys, same layout.
        v: Values, same layout.
        tokens_per_frame: H * W.

    Returns:
        `B N C`.
    """
    q, k, v = (t.unsqueeze(1) for t in (q, k, v))  # one head
    out = []
    for end in range(tokens_per_frame, q.shape[2] + 1, tokens_per_frame):
        out.append(F.scaled_dot_product_attention(q[:, :, end - tokens_per_frame : end], k[:, :, :end], v[:, :, :end]))
    return torch.cat(out, dim=2).squeeze(1)


class MidBlock(nn.Module):
    """Resnet, causal attention (optional), resnet at the deepest level."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([CausalAttention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class _Level(nn.Module):
    """One resolution level: `resnets` and an optional resampler in a list named `name`."""

    def __init__(self, resnets: Sequence[nn.Module], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.resample_name = name
        if resample is not None:
            self.add_module(name, nn.ModuleList([resample]))

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in getattr(self, self.resample_name, ()):
            x = resample(x)
        return x


class Encoder(nn.Module):
    """`B C 1+4k H W` in [-1, 1] -> `B 2*latent_channels 1+k H/8 W/8` (mean and log-variance)."""

    def __init__(self, p: Causal3DParams) -> None:
        super().__init__()
        widths, groups = p.block_out_channels, p.norm_num_groups
        self.conv_in = CausalConv3d(p.in_channels, widths[0])
        self.down_blocks = nn.ModuleList()
        block_in = widths[0]
        for width, factors in zip(widths, level_factors(p)):
            resnets = []
            for _ in range(p.layers_per_block):
                resnets.append(ResnetBlock(block_in, width, groups))
                block_in = width
            down = DownsampleCausal3D(width, factors) if factors != (1, 1, 1) else None
            self.down_blocks.append(_Level(resnets, down, "downsamplers"))
        self.mid_block = MidBlock(block_in, groups, p.mid_block_add_attention)
        self.conv_norm_out = _group_norm(block_in, groups)
        self.conv_out = CausalConv3d(block_in, 2 * p.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """`B latent_channels 1+k h w` -> `B C 1+4k 8h 8w`; each level has layers_per_block + 1 resnets."""

    def __init__(self, p: Causal3DParams) -> None:
        super().__init__()
        widths, groups = p.block_out_channels, p.norm_num_groups
        block_in = widths[-1]
        self.conv_in = CausalConv3d(p.latent_channels, block_in)
        self.mid_block = MidBlock(block_in, groups, p.mid_block_add_attention)
        # `up_blocks` is indexed in execution order (0 = deepest level), and up block i resamples
        # by the factors of encoder level i, not of its mirror image: the decoder upsamples
        # (1,2,2), (2,2,2), (2,2,2) from the deepest level out, so its temporal steps act at
        # finer resolutions than the encoder's.
        self.up_blocks = nn.ModuleList()
        for width, factors in zip(reversed(widths), level_factors(p)):
            resnets = []
            for _ in range(p.layers_per_block + 1):
                resnets.append(ResnetBlock(block_in, width, groups))
                block_in = width
            up = UpsampleCausal3D(width, factors) if factors != (1, 1, 1) else None
            self.up_blocks.append(_Level(resnets, up, "upsamplers"))
        self.conv_norm_out = _group_norm(block_in, groups)
        self.conv_out = CausalConv3d(block_in, p.out_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKLCausal3D(nn.Module):
    """Causal 3D video VAE: 4x temporal, 8x spatial compression, 16 latent channels.

    `encode` maps `B C T H W` in [-1, 1], T = 1+4k, to `scale_factor * (z - shift_factor)` of
    shape `B 16 1+k H/8 W/8`, with `z` a posterior sample (or its mode); `decode` inverts the
    scaling and decodes T' latent frames to 4(T'-1)+1 frames.
    """

    def __init__(self, params: Causal3DParams) -> None:
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.quant_conv = nn.Conv3d(2 * params.latent_channels, 2 * params.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(params.latent_channels, params.latent_channels, kernel_size=1)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def check_input(self, x: Tensor) -> None:
        """Raises ValueError unless `x` is `B C T H W` with T = 1+4k and H, W multiples of 8."""
        p = self.params
        if x.ndim != 5 or x.shape[1] != p.in_channels:
            raise ValueError(f"expected video B {p.in_channels} T H W, got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        tc, sc = p.time_compression_ratio, p.spatial_compression_ratio
        if (t - 1) % tc:
            raise ValueError(f"the causal 3D VAE takes 1+{tc}k frames (1, {1 + tc}, {1 + 2 * tc}, ...), got {t}")
        if h % sc or w % sc:
            raise ValueError(f"height and width must be multiples of {sc}, got {h}x{w}")

    def posterior(self, x: Tensor) -> DiagonalGaussianDistribution:
        """The posterior over unscaled latents, laid out `B C T' h w`."""
        self.check_input(x)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def encode(
        self,
        x: Tensor,
        sample: bool = True,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Encodes a clip to scaled latents.

        Args:
            x: `B C T H W` in [-1, 1], T = 1+4k, H and W multiples of 8.
            sample: Draw from the posterior (Open-Sora's default) rather than take its mean.
            generator: For the sample: one generator, or one per batch item.

        Returns:
            `scale_factor * (z - shift_factor)` (`B C' 1+k H/8 W/8`) and the posterior of `z`.
        """
        posterior = self.posterior(x)
        return posterior.latent(self.scale_latent, sample, generator), posterior

    def scale_latent(self, z: Tensor) -> Tensor:
        return self.scale_factor * (z - self.shift_factor)

    def unscale_latent(self, latent: Tensor) -> Tensor:
        return latent / self.scale_factor + self.shift_factor

    def check_latent(self, latent: Tensor) -> None:
        """Raises ValueError unless `latent` is `B latent_channels T' h w`."""
        if latent.ndim != 5 or latent.shape[1] != self.params.latent_channels:
            raise ValueError(f"expected latents B {self.params.latent_channels} T h w, got {tuple(latent.shape)}")

    def decode(self, latent: Tensor) -> Tensor:
        """Decodes scaled latents `B C' T' h w` to `B C 4(T'-1)+1 8h 8w`, roughly in [-1, 1]."""
        self.check_latent(latent)
        return self.decoder(self.post_quant_conv(self.unscale_latent(latent)))
