"""Chunked (streaming) encode and decode for the causal 3D VAE, with bounded activation memory.

A clip goes through the network a few frames at a time, and everything a later frame needs
from earlier frames is carried from chunk to chunk, so no overlapping tiles are computed twice:

- every causal conv keeps the input frames its next outputs still need (k-1 frames at stride 1;
  at temporal stride 2 the alignment is tracked in global frame indices, so a chunk of any size
  yields exactly the outputs of the full clip);
- the mid-block attention keeps the keys and values of all earlier frames (preallocated for the
  whole clip: at the latent resolution, about as large as the input video in the model dtype);
- each upsampler knows whether the clip's first frame (upsampled in space only) has passed.

With all that, a chunk's outputs equal the full clip's except for the GroupNorms, whose
statistics the reference takes over all frames of the clip (see `vae/causal_3d.py`): no frame
can be normalised exactly before the whole clip has been seen. `norm` picks the statistics:

- "causal" (the default): frame t is normalised with the statistics of frames 0..t (running
  sums carried across chunks). The latents do not depend on the chunk size, hence not on the
  memory budget or the GPU that planned it (up to float rounding: convs over other extents may
  pick other kernels), which a resumable, distributed latent cache needs; the model becomes
  strictly causal (a prefix of the clip encodes to a prefix of the latents). It differs from
  the untiled encode most at the first frames, where the statistics cover few frames.
- "chunk": each chunk's own statistics. Somewhat closer to untiled than "causal" below, but
  the latents change with the chunk size, so with the budget; reproducible only if it is pinned.
- "clip": approximates the full-clip statistics by repeating the encode: the first pass runs
  "causal" and sums each GroupNorm's input over the clip; every later pass normalises with the
  previous pass's sums. Pass p gets the first p GroupNorms (in execution order) exactly right,
  so `passes` = (number of GroupNorms) + 1 reproduces the untiled encode (the tests use this to
  show that everything else about the chunking is exact), but with few passes the iteration is
  not a contraction: later GroupNorms see inputs that drifted from the statistics they are given.

Measured with benchmarks/causal_norm_stats.py (its default run: 129 frames with a scene cut,
128x128, a narrow model of the released depth fitted for 400 steps / the same with random
weights; mean |diff| of the posterior mean from the untiled one, over its std):

    Open-Sora temporal tiles 64+1       0.15 / 0.65     "chunk", 8 latent frames     0.22 / 0.73
    Open-Sora spatial tiles, whole clip 0.18 / 0.34     "chunk", 4 latent frames     0.28 / 0.75
    16+1 tiles (diffusers' default)     0.27 / 0.78     "clip", 2 passes             0.26 / 2.31
    "causal", any chunk size            0.30 / 0.77     "clip", 3 passes            20.3  / 0.71

Every split in time moves these latents by a sizeable fraction of their spread, Open-Sora's
own temporal tiles included; "clip" with few passes is erratic. No trained checkpoint was at
hand: rerun the script with `--checkpoint` before trusting the ranking.

Statistics are summed in float64 from per-frame means and centred sums of squares, and the
normalisation is done in float32, as PyTorch's GroupNorm does for half inputs.
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vae.causal_3d import (
    AutoencoderKLCausal3D,
    CausalAttention,
    CausalConv3d,
    Decoder,
    DownsampleCausal3D,
    Encoder,
    MidBlock,
    ResnetBlock,
    UpsampleCausal3D,
    _Level,
)
from vae.spec import NormStats, decoded_frames, latent_frames

NORM_STATS = get_args(NormStats)


def chunk_bounds(num_frames: int, chunk: int, factor: int) -> list[tuple[int, int]]:
    """Frame ranges of the chunks of a clip of `num_frames` = 1 + factor*k frames.

    The first chunk holds 1 + factor*chunk frames (chunk + 1 output frames), the others
    factor*chunk frames (chunk output frames); the last may be shorter. With factor 1 the same
    rule splits latent frames.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 latent frame, got {chunk}")
    bounds, start, end = [], 0, min(num_frames, 1 + factor * chunk)
    while start < num_frames:
        bounds.append((start, end))
        start, end = end, min(num_frames, end + factor * chunk)
    return bounds


class _GroupNormStats:
    """Running float64 sums of one GroupNorm's input: count, sum and sum of squares per (b, group)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None  # B G
        self.squares: Tensor | None = None  # B G

    def mean_var(self) -> tuple[Tensor, Tensor]:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.count
        return mean, self.squares / self.count - mean.square()


class _Stream:
    """State carried from chunk to chunk through one encoder or decoder.

    Args:
        norm: "causal", "chunk", or "fixed" (normalise with `fixed` statistics).
        frames: Frames of the whole clip at the mid block (sizes the attention cache).
        fixed: Per-GroupNorm (mean, var) from an earlier pass, for "fixed".
    """

    def __init__(self, norm: str, frames: int, fixed: dict[nn.GroupNorm, tuple[Tensor, Tensor]] | None = None) -> None:
        self.norm_mode = norm
        self.frames = frames
        self.fixed = fixed or {}
        self.stats: dict[nn.GroupNorm, _GroupNormStats] = {}
        self.convs: dict[CausalConv3d, tuple[Tensor, int, int]] = {}  # (kept frames, index of the first, next output)
        self.kv: dict[CausalAttention, tuple[Tensor, Tensor, int]] = {}  # (keys, values, frames filled)
        self.upsampled: set[UpsampleCausal3D] = set()  # upsamplers past the clip's first frame

    # -- layers ------------------------------------------------------------------------

    def conv(self, m: CausalConv3d, x: Tensor) -> Tensor:
        """The outputs of `m` that the frames seen so far determine, from the new frames `x`."""
        k = m.kernel_size
        if k == 1:
            return m.conv(x)
        stride = m.conv.stride[0]
        if m in self.convs:
            kept, first, next_out = self.convs[m]
        else:  # the frames before the clip are copies of its first frame, as in CausalConv3d.pad
            kept, first, next_out = x[:, :, :1].expand(-1, -1, k - 1, -1, -1), 1 - k, 0
        # Output J reads input frames stride*J-(k-1) .. stride*J (global indices).
        available = kept.shape[2] + x.shape[2]
        outputs = max(0, (available - k) // stride + 1)
        y = m.conv(_pad_frames(kept, x, k // 2)) if outputs else x.new_empty(0)
        next_out += outputs
        drop = stride * next_out - (k - 1) - first  # frames no later output reads
        # A new (small) tensor, so that no view keeps the whole chunk alive.
        rest = torch.cat([kept[:, :, drop:], x[:, :, max(0, drop - kept.shape[2]) :]], dim=2)
        self.convs[m] = (rest, first + drop, next_out)
        return y

    def norm(self, m: nn.GroupNorm, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        groups = m.num_groups
        xg = x.reshape(b, groups, c // groups, t, h * w)
        n = xg.shape[2] * xg.shape[4]  # values per group and frame
        frame_mean = xg.mean(dim=(2, 4), dtype=torch.float32)  # B G T
        y = xg.float() - frame_mean[:, :, None, :, None]
        frame_m2 = torch.linalg.vector_norm(y, dim=(2, 4)).double().square()
        frame_mean = frame_mean.double()
        # Per-frame sums; running sums start from what earlier chunks left (a sequential cumsum
        # with the carry in front adds in the same order whatever the chunking).
        totals = torch.stack([n * frame_mean, frame_m2 + n * frame_mean.square()])  # 2 B G T
        stats = self.stats.setdefault(m, _GroupNormStats())
        if stats.total is None:
            carry = torch.zeros_like(totals[:, :, :, :1])
        else:
            carry = torch.stack([stats.total, stats.squares])[:, :, :, None]
        running = torch.cat([carry, totals], dim=3).cumsum(dim=3)[:, :, :, 1:]
        counts = stats.count + n * torch.arange(1, t + 1, dtype=torch.float64, device=x.device)
        stats.count += n * t
        stats.total, stats.squares = running[0, :, :, -1], running[1, :, :, -1]

        if self.norm_mode == "causal":
            mean = running[0] / counts
            var = running[1] / counts - mean.square()
        elif self.norm_mode == "chunk":
            chunk_sums = totals.sum(dim=3, keepdim=True)
            mean = chunk_sums[0] / (n * t)
            var = chunk_sums[1] / (n * t) - mean.square()
        else:
            mean, var = (s[:, :, None] for s in self.fixed[m])
        rstd = (var.clamp(min=0) + m.eps).rsqrt()
        y += (frame_mean - mean).float()[:, :, None, :, None]
        y *= rstd.float()[:, :, None, :, None]
        y = y.view(b, c, t, h, w)
        if m.affine:
            y.mul_(m.weight.view(1, c, 1, 1, 1).float()).add_(m.bias.view(1, c, 1, 1, 1).float())
        return y.to(x.dtype)

    def attention(self, m: CausalAttention, x: Tensor) -> Tensor:
        _, _, t, h, w = x.shape
        hw = h * w
        y = rearrange(self.norm(m.group_norm, x), "b c t h w -> b (t h w) c")
        q, k, v = m.to_q(y), m.to_k(y), m.to_v(y)
        if m not in self.kv:
            shape = (k.shape[0], 1, self.frames * hw, k.shape[2])
            self.kv[m] = (k.new_empty(shape), v.new_empty(shape), 0)
        keys, values, filled = self.kv[m]
        keys[:, 0, filled * hw : (filled + t) * hw] = k
        values[:, 0, filled * hw : (filled + t) * hw] = v
        self.kv[m] = (keys, values, filled + t)
        q = q[:, None]
        out = [
            F.scaled_dot_product_attention(q[:, :, i * hw : (i + 1) * hw], keys[:, :, :end], values[:, :, :end])
            for i, end in enumerate(range((filled + 1) * hw, (filled + t) * hw + 1, hw))
        ]
        y = rearrange(m.to_out[0](torch.cat(out, dim=2)[:, 0]), "b (t h w) c -> b c t h w", t=t, h=h, w=w)
        return x + y

    def upsample(self, m: UpsampleCausal3D, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=m.factors, mode="nearest")
        if m not in self.upsampled:  # the clip's first frame is repeated in space only
            self.upsampled.add(m)
            x = x[:, :, m.factors[0] - 1 :]
        return self.conv(m.conv, x)

    # -- blocks (the same order of operations as the modules' forward) ---------------------

    def resnet(self, m: ResnetBlock, x: Tensor) -> Tensor:
        h = self.conv(m.conv1, F.silu(self.norm(m.norm1, x)))
        h = self.conv(m.conv2, F.silu(self.norm(m.norm2, h)))
        if m.conv_shortcut is not None:
            x = self.conv(m.conv_shortcut, x)
        return x + h

    def level(self, m: _Level, x: Tensor) -> Tensor:
        for resnet in m.resnets:
            x = self.resnet(resnet, x)
        for resample in getattr(m, m.resample_name, ()):
            if isinstance(resample, DownsampleCausal3D):
                x = self.conv(resample.conv, x)
            else:
                x = self.upsample(resample, x)
        return x

    def mid(self, m: MidBlock, x: Tensor) -> Tensor:
        x = self.resnet(m.resnets[0], x)
        for attention in m.attentions:
            x = self.attention(attention, x)
        return self.resnet(m.resnets[1], x)

    def encoder(self, m: Encoder, x: Tensor) -> Tensor:
        h = self.conv(m.conv_in, x)
        for level in m.down_blocks:
            h = self.level(level, h)
        h = self.mid(m.mid_block, h)
        return self.conv(m.conv_out, F.silu(self.norm(m.conv_norm_out, h)))

    def decoder(self, m: Decoder, z: Tensor) -> Tensor:
        h = self.mid(m.mid_block, self.conv(m.conv_in, z))
        for level in m.up_blocks:
            h = self.level(level, h)
        return self.conv(m.conv_out, F.silu(self.norm(m.conv_norm_out, h)))

    def clip_stats(self) -> dict[nn.GroupNorm, tuple[Tensor, Tensor]]:
        """Each GroupNorm's (mean, var) over everything streamed so far."""
        return {m: s.mean_var() for m, s in self.stats.items()}


def _pad_frames(kept: Tensor, x: Tensor, p: int) -> Tensor:
    """`cat([kept, x], T)` padded by `p` in H and W by replicating the border, in one allocation.

    The same values as CausalConv3d.pad gives the full clip, built without an intermediate
    concatenation (which would hold one more chunk-sized activation at the peak).
    """
    b, c, n, h, w = kept.shape
    out = x.new_empty(b, c, n + x.shape[2], h + 2 * p, w + 2 * p)
    inner = out[:, :, :, p : p + h, p : p + w]
    inner[:, :, :n] = kept
    inner[:, :, n:] = x
    if p:
        out[..., p : p + h, :p] = out[..., p : p + h, p : p + 1]
        out[..., p : p + h, p + w :] = out[..., p : p + h, p + w - 1 : p + w]
        out[..., :p, :] = out[..., p : p + 1, :]
        out[..., p + h :, :] = out[..., p + h - 1 : p + h, :]
    return out


def _check_norm(norm: str, passes: int) -> None:
    if norm not in NORM_STATS:
        raise ValueError(f"norm must be one of {NORM_STATS}, got {norm!r}")
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")


@torch.no_grad()
def stream_encode(
    model: AutoencoderKLCausal3D, x: Tensor, chunk: int, norm: NormStats = "causal", passes: int = 2
) -> Tensor:
    """Encodes `B C T H W` (T = 1+4k) chunk by chunk to the posterior parameters (`quant_conv` output).

    Args:
        model: The causal 3D VAE.
        x: The clip, in [-1, 1].
        chunk: Latent frames per chunk (the first chunk has one more: 1 + 4*chunk frames).
        norm: GroupNorm statistics (see the module docstring).
        passes: Encoder passes for norm "clip" (ignored otherwise).

    Returns:
        `B 2*latent_channels 1+k H/8 W/8`, as `model.quant_conv(model.encoder(x))` up to the norms.
    """
    _check_norm(norm, passes)
    model.check_input(x)
    tc = model.params.time_compression_ratio
    num_latent = latent_frames(x.shape[2], tc, causal=True)
    bounds = chunk_bounds(x.shape[2], chunk, tc)
    fixed = None
    for p in range(passes if norm == "clip" else 1):
        stream = _Stream(norm if norm != "clip" else ("causal" if p == 0 else "fixed"), num_latent, fixed)
        last = p == (passes if norm == "clip" else 1) - 1
        out = None
        for start, end in bounds:
            h = stream.encoder(model.encoder, x[:, :, start:end])
            if not last:
                continue
            moments = model.quant_conv(h)
            if out is None:
                out = moments.new_empty(*moments.shape[:2], num_latent, *moments.shape[3:])
            first = latent_frames(start, tc, causal=True)  # latent index of the chunk's first output
            out[:, :, first : first + moments.shape[2]] = moments
        fixed = stream.clip_stats()
    assert out is not None
    return out


@torch.no_grad()
def stream_decode(
    model: AutoencoderKLCausal3D, latent: Tensor, chunk: int, norm: NormStats = "causal", passes: int = 2
) -> Tensor:
    """Decodes scaled latents `B C T' h w` chunk by chunk to `B 3 4(T'-1)+1 8h 8w`.

    Args:
        model: The causal 3D VAE.
        latent: Scaled latents, as `model.encode` returns them.
        chunk: Latent frames per chunk (the first chunk has one more).
        norm: GroupNorm statistics (see the module docstring).
        passes: Decoder passes for norm "clip" (ignored otherwise).
    """
    _check_norm(norm, passes)
    model.check_latent(latent)
    z = model.post_quant_conv(model.unscale_latent(latent))
    frames = decoded_frames(z.shape[2], model.params.time_compression_ratio, causal=True)
    fixed = None
    for p in range(passes if norm == "clip" else 1):
        stream = _Stream(norm if norm != "clip" else ("causal" if p == 0 else "fixed"), z.shape[2], fixed)
        last = p == (passes if norm == "clip" else 1) - 1
        out, filled = None, 0
        for start, end in chunk_bounds(z.shape[2], chunk, 1):
            video = stream.decoder(model.decoder, z[:, :, start:end])
            if not last:
                continue
            if out is None:
                out = video.new_empty(*video.shape[:2], frames, *video.shape[3:])
            out[:, :, filled : filled + video.shape[2]] = video
            filled += video.shape[2]
        fixed = stream.clip_stats()
    assert out is not None
    return out


def group_norm_count(module: nn.Module) -> int:
    """GroupNorms in `module`: `passes` = this + 1 makes norm "clip" exact."""
    return sum(isinstance(m, nn.GroupNorm) for m in module.modules())
