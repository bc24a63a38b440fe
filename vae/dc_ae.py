"""Open-Sora's video DC-AE (`dc-ae-f32t4c128`): a deterministic 32x spatial, 4x temporal autoencoder.

Architecture facts come from Open-Sora's `opensora/models/dc_ae` (itself MIT-efficientvit's
DC-AE made 3D) and its `dc-ae-f32t4c128` zoo entry. Parameter names and shapes match the public
`F32T4C128_AE.safetensors`, so that file loads with strict key checking. Tiling is not done here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vae.dc_ae_blocks import (
    ChannelAveragingDownsample,
    ChannelDuplicatingUpsample,
    ConvNorm3d,
    EfficientViTBlock,
    OpSequence,
    Residual,
    RMSNorm3d,
    downsample_block,
    res_block,
    upsample_block,
)

BLOCK_TYPES = ("ResBlock", "EViT")


@dataclass(frozen=True)
class DCAEParams:
    """Architecture and scaling of a video DC-AE; the defaults are Open-Sora's `dc-ae-f32t4c128`.

    Stage `i` runs at 1/2^i of the input's height and width. Both the encoder and the decoder
    use `block_types[i]` at stage `i` (Open-Sora's zoo entry gives both the same list).
    """

    in_channels: int = 3
    latent_channels: int = 128
    widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    # "ResBlock": conv-SiLU-conv-RMSNorm; "EViT": LiteMLA linear attention + GLUMBConv.
    block_types: tuple[str, ...] = ("ResBlock", "ResBlock", "ResBlock", "EViT", "EViT", "EViT")
    # Whether the transition from stage i to stage i+1 also halves (doubles, decoding) time.
    # Open-Sora's zoo entry sets this for the stage 3->4 and 4->5 transitions: 4x in time.
    temporal_resample: tuple[bool, ...] = (False, False, False, True, True)
    head_dim: int = 32  # EfficientViTBlock default (heads = width // 32)
    attn_scales: tuple[int, ...] = (5,)  # "EViTS5": one multi-scale branch with a 5^3 depthwise conv
    expand_ratio: int = 4  # GLUMBConv hidden width = 4x
    norm_eps: float = 1e-5
    # Open-Sora's convention: `latent = z / scaling_factor`, `z = latent * scaling_factor`
    # (scaling_factor is std(z), the reverse of diffusers). None means no scaling, as in
    # Open-Sora's inference configs; its DC-AE diffusion training config sets 0.493.
    scaling_factor: float | None = None

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.widths) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temporal_resample)

    def validate(self) -> None:
        """Raises ValueError if the lists disagree in length or name an unknown block type."""
        n = len(self.widths)
        for name in ("encoder_depths", "decoder_depths", "block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} stages")
        if len(self.temporal_resample) != n - 1:
            raise ValueError(f"temporal_resample needs {n - 1} entries (one per stage transition)")
        unknown = set(self.block_types) - set(BLOCK_TYPES)
        if unknown:
            raise ValueError(f"unknown block types {sorted(unknown)}; known: {BLOCK_TYPES}")
        if min(self.encoder_depths) < 1 or min(self.decoder_depths) < 1:
            # The reference skips the resampler of an empty stage, which changes the compression.
            raise ValueError("every stage needs at least one block")
        if self.scaling_factor is not None and self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")


def _stage_blocks(p: DCAEParams, stage: int, depth: int) -> list[nn.Module]:
    width = p.widths[stage]
    if p.block_types[stage] == "ResBlock":
        return [res_block(width, p.norm_eps) for _ in range(depth)]
    return [EfficientViTBlock(width, p.head_dim, p.attn_scales, p.expand_ratio, p.norm_eps) for _ in range(depth)]


class Encoder(nn.Module):
    """`B 3 T H W` -> `B latent_channels T/4 H/32 W/32` (T = 1 stays 1)."""

    def __init__(self, p: DCAEParams) -> None:
        super().__init__()
        self.project_in = ConvNorm3d(p.in_channels, p.widths[0], 3, bias=True)
        stages = []
        for i, depth in enumerate(p.encoder_depths):
            ops = _stage_blocks(p, i, depth)
            if i < len(p.widths) - 1:
                ops.append(downsample_block(p.widths[i], p.widths[i + 1], p.temporal_resample[i]))
            stages.append(OpSequence(ops))
        self.stages = nn.ModuleList(stages)
        # No norm or activation before the output conv; its shortcut averages channel groups.
        self.project_out = Residual(
            OpSequence([ConvNorm3d(p.widths[-1], p.latent_channels, 3, bias=True)]),
            ChannelAveragingDownsample(p.widths[-1], p.latent_channels, factor=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


class Decoder(nn.Module):
    """`B latent_channels T' h w` -> `B 3 T H W`, with T = 4 T' (but 1 frame for T' = 1)."""

    def __init__(self, p: DCAEParams) -> None:
        super().__init__()
        self.project_in = Residual(
            ConvNorm3d(p.latent_channels, p.widths[-1], 3, bias=True),
            ChannelDuplicatingUpsample(p.latent_channels, p.widths[-1], factor=1),
        )
        # `stages` is indexed by resolution (0 = full), as in the checkpoint, but runs from the
        # deepest stage to stage 0; each stage but the deepest starts by upsampling into it.
        stages = []
        for i, depth in enumerate(p.decoder_depths):
            ops = []
            if i < len(p.widths) - 1:
                ops.append(upsample_block(p.widths[i + 1], p.widths[i], p.temporal_resample[i]))
            stages.append(OpSequence(ops + _stage_blocks(p, i, depth)))
        self.stages = nn.ModuleList(stages)
        self.project_out = OpSequence(
            [RMSNorm3d(p.widths[0], p.norm_eps), nn.ReLU(), ConvNorm3d(p.widths[0], p.in_channels, 3, bias=True)]
        )

    def forward(self, z: Tensor) -> Tensor:
        x = self.project_in(z)
        for stage in reversed(self.stages):
            x = stage(x)
        return self.project_out(x)


class DCAE(nn.Module):
    """Video DC-AE with the same interface as `AutoEncoder2D` (but a deterministic encoder).

    `encode` maps `B C T H W` in [-1, 1] (T = 1 or a multiple of 4, H and W multiples of 32)
    to `z / scaling_factor` (just `z` when `scaling_factor` is None); `decode` multiplies back
    and decodes. Batch items are independent, so batching gives the same result as Open-Sora's
    one-sample-at-a-time loop.
    """

    def __init__(self, params: DCAEParams) -> None:
        super().__init__()
        params.validate()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scaling_factor = params.scaling_factor

    def check_input(self, x: Tensor) -> None:
        """Raises ValueError, saying what would be accepted, for a video this model cannot encode."""
        p = self.params
        if x.ndim != 5 or x.shape[1] != p.in_channels:
            raise ValueError(f"DC-AE expects B {p.in_channels} T H W video, got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        tc, sc = p.temporal_compression, p.spatial_compression
        problems = []
        if t < 1 or (t != 1 and t % tc):
            problems.append(f"{t} frames (T must be 1 or a multiple of {tc})")
        for label, size in (("height", h), ("width", w)):
            if size < sc or size % sc:
                problems.append(f"{label} {size} (must be a positive multiple of {sc})")
        if problems:
            raise ValueError("DC-AE cannot encode " + ", ".join(problems))

    def encode(
        self,
        x: Tensor,
        sample: bool = True,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[Tensor, None]:
        """Encodes a video; deterministic.

        Args:
            x: `B C T H W` in [-1, 1].
            sample: Ignored (there is no posterior); accepted for a common VAE interface.
            generator: Ignored, as `sample`.

        Returns:
            `(latent, None)`, latent `B latent_channels T' H/32 W/32` with T' = T // 4 (1 for T = 1).

        Raises:
            ValueError: The shape does not follow the frame and size rules.
        """
        del sample, generator
        self.check_input(x)
        z = self.encoder(x)
        if self.scaling_factor is not None:
            z = z / self.scaling_factor
        return z, None

    def decode(self, latent: Tensor) -> Tensor:
        """Decodes `B latent_channels T' h w` to `B C T 32h 32w` with T = 4 T', or 1 frame when T' = 1.

        A 1-frame latent never upsamples in time, so the latent of a 4-frame clip decodes to a
        single frame, as in Open-Sora.
        """
        if latent.ndim != 5 or latent.shape[1] != self.params.latent_channels:
            raise ValueError(
                f"DC-AE expects a B {self.params.latent_channels} T h w latent, got shape {tuple(latent.shape)}"
            )
        if self.scaling_factor is not None:
            latent = latent * self.scaling_factor
        return self.decoder(latent)
