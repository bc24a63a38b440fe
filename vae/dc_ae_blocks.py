"""Building blocks of Open-Sora's video DC-AE (deep compression autoencoder).

Attribute names follow the MIT-efficientvit layout used by Open-Sora's `F32T4C128_AE.safetensors`
(`main`, `op_list`, `context_module`, `qkv`, `aggreg`, ...), so that checkpoint loads with
strict key checking. Every convolution is 3D, non-causal, with zero "same" padding; a 1-frame
input flows through the same layers (the temporal resamplers leave T = 1 alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

# Added to the linear-attention denominator; as in the reference (it only matters when every
# key of a head is zeroed by the ReLU kernel).
LINEAR_ATTENTION_EPS = 1e-15


class RMSNorm3d(nn.Module):
    """RMS norm over channels (dim 1) of `B C T H W`, with a per-channel weight and bias.

    The mean square is taken in fp32, so bf16 activations with large channel counts are
    normalised as accurately as fp32 ones.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = (x32 / torch.sqrt(x32.square().mean(dim=1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


class ConvNorm3d(nn.Module):
    """A 3D convolution with zero "same" padding, optionally followed by an RMSNorm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int | tuple[int, int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=bias
        )
        self.norm = RMSNorm3d(out_channels, norm_eps) if norm_eps is not None else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return self.norm(x) if self.norm is not None else x


class OpSequence(nn.Module):
    """Runs `op_list` in order (a stage, or a projection made of several ops)."""

    def __init__(self, ops: Sequence[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: Tensor) -> Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class Residual(nn.Module):
    """`main(x) + shortcut(x)`; the shortcut is the identity when None."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


class ResBlockMain(nn.Module):
    """conv3x3 (bias) -> SiLU -> conv3x3 (no bias) -> RMSNorm; the residual branch of a ResBlock."""

    def __init__(self, channels: int, norm_eps: float) -> None:
        super().__init__()
        self.conv1 = ConvNorm3d(channels, channels, 3, bias=True)
        self.conv2 = ConvNorm3d(channels, channels, 3, bias=False, norm_eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.silu(self.conv1(x)))


def res_block(channels: int, norm_eps: float) -> Residual:
    """`x + RMSNorm(conv(SiLU(conv(x))))`, the block of the convolutional stages."""
    return Residual(ResBlockMain(channels, norm_eps))


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention over all T*H*W positions (EfficientViT's LiteMLA).

    The 1x1 `qkv` conv gives, per head, `head_dim` query, key and value channels. Each
    `aggreg` branch mixes them locally (a depthwise k^3 conv, then a 1x1 conv grouped per
    head and per q/k/v) to form extra heads; all heads then attend linearly:
    `out = (v k^T) q / (sum_n k_n . q)`, with q and k passed through ReLU.
    """

    def __init__(self, channels: int, head_dim: int, scales: Sequence[int], norm_eps: float) -> None:
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention width {channels} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        heads = channels // head_dim
        qkv_channels = 3 * channels
        self.qkv = ConvNorm3d(channels, qkv_channels, 1, bias=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(qkv_channels, qkv_channels, k, padding=k // 2, groups=qkv_channels, bias=False),
                nn.Conv3d(qkv_channels, qkv_channels, 1, groups=3 * heads, bias=False),
            )
            for k in scales
        )
        self.proj = ConvNorm3d(channels * (1 + len(scales)), channels, 1, bias=False, norm_eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(branch(qkv) for branch in self.aggreg)], dim=1)
        return self.proj(self._attend(qkv).to(x.dtype))

    def _attend(self, qkv: Tensor) -> Tensor:
        # In fp32 whatever the model dtype: the numerator and the denominator are sums over all
        # T*H*W positions, and their ratio loses most of its bits in bf16. (The reference keeps
        # bf16 for the matmuls; in fp32 the two agree to rounding.)
        _, _, t, h, w = qkv.shape
        d = self.head_dim
        qkv = rearrange(qkv.float(), "b (heads c) t h w -> b heads c (t h w)", c=3 * d)
        q, k, v = F.relu(qkv[:, :, :d]), F.relu(qkv[:, :, d : 2 * d]), qkv[:, :, 2 * d :]
        numerator = (v @ k.transpose(-1, -2)) @ q  # b heads d n
        denominator = k.sum(dim=-1, keepdim=True).transpose(-1, -2) @ q  # b heads 1 n
        out = numerator / (denominator + LINEAR_ATTENTION_EPS)
        return rearrange(out, "b heads c (t h w) -> b (heads c) t h w", t=t, h=h, w=w)


class GLUMBConv(nn.Module):
    """Gated inverted bottleneck: 1x1 expand (SiLU) -> depthwise 3^3 -> GLU (SiLU gate) -> 1x1 + RMSNorm."""

    def __init__(self, channels: int, expand_ratio: int, norm_eps: float) -> None:
        super().__init__()
        hidden = channels * expand_ratio
        self.inverted_conv = ConvNorm3d(channels, 2 * hidden, 1, bias=True)
        self.depth_conv = ConvNorm3d(2 * hidden, 2 * hidden, 3, groups=2 * hidden, bias=True)
        self.point_conv = ConvNorm3d(hidden, channels, 1, bias=False, norm_eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.depth_conv(F.silu(self.inverted_conv(x)))
        x, gate = x.chunk(2, dim=1)
        return self.point_conv(x * F.silu(gate))


class EfficientViTBlock(nn.Module):
    """`x + LiteMLA(x)`, then `x + GLUMBConv(x)`."""

    def __init__(self, channels: int, head_dim: int, scales: Sequence[int], expand_ratio: int, norm_eps: float) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, head_dim, scales, norm_eps))
        self.local_module = Residual(GLUMBConv(channels, expand_ratio, norm_eps))

    def forward(self, x: Tensor) -> Tensor:
        return self.local_module(self.context_module(x))


def _resamples_time(temporal: bool, num_frames: int) -> bool:
    # A single frame is never resampled in time: images pass through the video model as T = 1.
    return temporal and num_frames != 1


class ChannelAveragingDownsample(nn.Module):
    """Parameter-free shortcut of a downsampler: space-to-channels, then mean over channel groups.

    With `factor` 2 each 2x2 (or 2x2x2 when `temporal`) block of positions is moved into the
    channels, laid out `(c, dt, dh, dw)`; consecutive groups of the result are then averaged
    down to `out_channels`. `factor` 1 only averages channel groups.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int, temporal: bool = False) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor = factor
        self.temporal = temporal
        for volume in {factor**2, factor ** (3 if temporal else 2)}:
            if in_channels * volume % out_channels:
                raise ValueError(f"cannot average {in_channels}x{volume} channels down to {out_channels}")

    def forward(self, x: Tensor) -> Tensor:
        if self.factor == 2:
            if _resamples_time(self.temporal, x.shape[2]):
                x = rearrange(x, "b c (t dt) (h dh) (w dw) -> b (c dt dh dw) t h w", dt=2, dh=2, dw=2)
            else:
                x = rearrange(x, "b c t (h dh) (w dw) -> b (c dh dw) t h w", dh=2, dw=2)
        return rearrange(x, "b (c g) t h w -> b c g t h w", c=self.out_channels).mean(dim=2)


class ChannelDuplicatingUpsample(nn.Module):
    """Parameter-free shortcut of an upsampler: repeat each channel, then channels-to-space.

    The inverse layout of `ChannelAveragingDownsample`: channel `c` is repeated consecutively,
    and the result is read as `(c, dt, dh, dw)` and moved into a 2x2 (2x2x2) block of positions.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int, temporal: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.factor = factor
        self.temporal = temporal
        for volume in {factor**2, factor ** (3 if temporal else 2)}:
            if out_channels * volume % in_channels:
                raise ValueError(f"cannot duplicate {in_channels} channels up to {out_channels}x{volume}")

    def forward(self, x: Tensor) -> Tensor:
        in_time = _resamples_time(self.temporal, x.shape[2])
        volume = self.factor ** (3 if in_time else 2)
        x = repeat(x, "b c t h w -> b (c r) t h w", r=self.out_channels * volume // self.in_channels)
        if self.factor == 1:
            return x
        if in_time:
            return rearrange(x, "b (c dt dh dw) t h w -> b c (t dt) (h dh) (w dw)", dt=2, dh=2, dw=2)
        return rearrange(x, "b (c dh dw) t h w -> b c t (h dh) (w dw)", dh=2, dw=2)


class InterpolateConvUpsample(nn.Module):
    """Nearest-neighbour x2 upsampling (also in time when `temporal` and T > 1), then a 3^3 conv."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv = ConvNorm3d(in_channels, out_channels, 3, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        time_factor = 2 if _resamples_time(self.temporal, x.shape[2]) else 1
        return self.conv(F.interpolate(x, scale_factor=(time_factor, 2, 2), mode="nearest"))


def downsample_block(in_channels: int, out_channels: int, temporal: bool) -> Residual:
    """Stride-2 3^3 conv (stride 2 in time too when `temporal`) plus the averaging shortcut.

    With T = 1 the padded conv still gives one frame and the shortcut stays spatial.
    """
    stride = (2, 2, 2) if temporal else (1, 2, 2)
    return Residual(
        ConvNorm3d(in_channels, out_channels, 3, stride=stride, bias=True),
        ChannelAveragingDownsample(in_channels, out_channels, factor=2, temporal=temporal),
    )


def upsample_block(in_channels: int, out_channels: int, temporal: bool) -> Residual:
    """Nearest upsampling + 3^3 conv, plus the duplicating shortcut."""
    return Residual(
        InterpolateConvUpsample(in_channels, out_channels, temporal),
        ChannelDuplicatingUpsample(in_channels, out_channels, factor=2, temporal=temporal),
    )
