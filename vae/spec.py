"""What a VAE is, as data: its preset, the shape rules, its family's behaviour, and tiling plans.

A `VAEPreset` is the single place where a model's constants live (compression ratios, latent
channels, allowed frame counts, size multiple, scale/shift); the job reads them from here and
records them in its output metadata, and nothing else retypes them. What differs between model
families (how a model is built and loaded, how it may be split in time and space, what a
chunked encode keeps in memory) is carried by the preset's `VAEFamily`, so the code that tiles,
plans and loads asks the family instead of testing which family it has.

This module imports nothing of the package: every other module may use it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

NormStats = Literal["causal", "chunk", "clip"]  # GroupNorm statistics of causal-VAE chunks (vae/causal_3d_stream.py)
TilingMode = Literal["off", "opensora", "auto"]
TemporalSplit = Literal["none", "chunks", "tiles"]

PathLike = str | os.PathLike[str]


# -- frame and size rules -----------------------------------------------------------------------
# A model with temporal compression tc > 1 takes 1 + tc*k frames if causal (the first frame is
# encoded alone), else 1 frame (an image) or tc*k frames.


def frames_ok(num_frames: int, tc: int, causal: bool) -> bool:
    if num_frames < 1:
        return False
    if tc == 1:
        return True
    if causal:
        return (num_frames - 1) % tc == 0
    return num_frames == 1 or num_frames % tc == 0


def frame_rule(tc: int, causal: bool) -> str:
    if tc == 1:
        return "any"
    return f"1+{tc}k" if causal else f"1 or {tc}k"


def latent_frames(num_frames: int, tc: int, causal: bool) -> int:
    """Latent frames of an input of `num_frames` (a valid count)."""
    if tc == 1:
        return num_frames
    if causal:
        return (num_frames - 1) // tc + 1
    return max(1, num_frames // tc)


def decoded_frames(num_latent_frames: int, tc: int, causal: bool) -> int:
    """Frames decoded from `num_latent_frames`: a lone latent frame of a non-causal model is an image."""
    if causal:
        return (num_latent_frames - 1) * tc + 1
    return num_latent_frames * tc if num_latent_frames > 1 else 1


def valid_num_frames(at_most: int, tc: int, causal: bool) -> int:
    """The largest frame count the rule accepts that is at most `at_most` (0 if none)."""
    return next((t for t in range(at_most, 0, -1) if frames_ok(t, tc, causal)), 0)


def shape_problems(num_frames: int, height: int, width: int, tc: int, causal: bool, size_multiple: int) -> list[str]:
    """What is wrong with an input shape, each problem saying what would be accepted (empty if none)."""
    problems = []
    if not frames_ok(num_frames, tc, causal):
        near = valid_num_frames(num_frames, tc, causal)
        problems.append(
            f"{num_frames} frames (the rule is T = {frame_rule(tc, causal)}"
            + (f"; e.g. {near} or {near + tc})" if near else ")")
        )
    for label, size in (("height", height), ("width", width)):
        if size < size_multiple or size % size_multiple:
            problems.append(f"{label} {size} (must be a positive multiple of {size_multiple})")
    return problems


# -- tiling configs and plans -------------------------------------------------------------------


@dataclass(frozen=True)
class OpenSoraTiling:
    """The tiling switches and sizes an Open-Sora config gives one VAE family."""

    spatial: bool
    temporal: bool
    spatial_tile: int  # pixels per side of a tile
    temporal_tile: int  # frames per tile (causal VAE: each tile reads one frame more)
    overlap: float  # tile_overlap_factor


@dataclass(frozen=True)
class TilingConfig:
    """How the job may split an encode or decode (modes: see `vae/tiling.py`).

    Attributes:
        mode: "off", "opensora" or "auto".
        memory_budget: "auto": bytes the call may allocate on top of the weights and its input.
            None: 90% of the CUDA device's free memory at planning time (unbounded on CPU).
        norm: GroupNorm statistics of causal-VAE chunks (`vae/causal_3d_stream.py`).
        norm_passes: Encoder passes for norm "clip".
        spatial: "opensora": override the family's spatial tiling switch.
        temporal: "opensora": override the temporal tiling switch.
        spatial_tile: "opensora": override the tile size in pixels.
        temporal_tile: "opensora": override the tile length in frames.
        overlap: "opensora": override the overlap factor. "auto" uses it for any tiles it needs.
    """

    mode: TilingMode = "off"
    memory_budget: int | None = None
    norm: NormStats = "causal"
    norm_passes: int = 2
    spatial: bool | None = None
    temporal: bool | None = None
    spatial_tile: int | None = None
    temporal_tile: int | None = None
    overlap: float | None = None

    def __post_init__(self) -> None:
        # The choices are the Literal types (for API callers; a job's config was checked on load).
        if self.mode not in get_args(TilingMode):
            raise ValueError(f"tiling mode must be one of {get_args(TilingMode)}, got {self.mode!r}")
        if self.norm not in get_args(NormStats):
            raise ValueError(f"norm must be one of {get_args(NormStats)}, got {self.norm!r}")
        if self.overlap is not None and not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.norm_passes < 1:
            raise ValueError(f"norm_passes must be at least 1, got {self.norm_passes}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive bytes, got {self.memory_budget}")


@dataclass(frozen=True)
class TilePlan:
    """One concrete way to run an encode or decode. Sizes are on the video side.

    Attributes:
        temporal: "none"; "chunks" (exact: FLUX frames, causal-VAE streaming); or "tiles"
            (Open-Sora's overlapped temporal tiles).
        temporal_size: "chunks": latent frames per chunk (the causal VAE's first chunk has one
            more; for FLUX a latent frame is a frame). "tiles": frames per tile.
        spatial_tile: Pixels per side of a spatial tile; 0 for none. As in Open-Sora, tiling
            applies only to frames larger than the tile (on either side).
        overlap: Open-Sora's tile_overlap_factor, for spatial and temporal tiles.
        norm: GroupNorm statistics of causal-VAE chunks (ignored by the other families).
        norm_passes: Passes for norm "clip".
        estimated_bytes: The estimate the plan was chosen with ("auto"), else None.
        fits: Whether that estimate was within the budget (False: the smallest plan was taken).
    """

    temporal: TemporalSplit = "none"
    temporal_size: int = 0
    spatial_tile: int = 0
    overlap: float = 0.25
    norm: NormStats = "causal"
    norm_passes: int = 2
    estimated_bytes: int | None = field(default=None, compare=False)
    fits: bool = field(default=True, compare=False)

    @property
    def untiled(self) -> bool:
        return self.temporal == "none" and not self.spatial_tile

    def describe(self) -> str:
        """A short text for logs and metadata, e.g. "chunks of 8 latent frames, norm causal"."""
        parts = []
        if self.temporal == "chunks":
            norm = f"norm {self.norm}" + (f" x{self.norm_passes}" if self.norm == "clip" else "")
            parts.append(f"chunks of {self.temporal_size} latent frames, {norm}")
        elif self.temporal == "tiles":
            parts.append(f"temporal tiles of {self.temporal_size} frames, overlap {self.overlap}")
        if self.spatial_tile:
            parts.append(f"spatial tiles of {self.spatial_tile}px, overlap {self.overlap}")
        return ", ".join(parts) or "untiled"


# -- families and presets -------------------------------------------------------------------------

Encoder = Callable[[nn.Module, Tensor], Tensor]
Chunked = Callable[[nn.Module, Tensor, TilePlan], Tensor]


@dataclass(frozen=True)
class LatentRules:
    """The shape and scaling constants of a model, derived from its params by its family.

    Attributes:
        spatial_compression: Input pixels per latent pixel along H and W.
        temporal_compression: Input frames per latent frame (1 for frame-by-frame models).
        causal: Temporal causality; a causal model takes `1 + k * temporal_compression` frames.
        size_multiple: H and W must be multiples of this.
        latent_channels: Channels of the stored latent.
        scale_factor: Multiplier applied by `encode` (see `scaling`).
        shift_factor: Offset applied by `encode` (see `scaling`).
        scaling: The formula `encode` applies to the raw latent `z`, spelled out so that the
            stored latents can never be rescaled the wrong way round.
    """

    spatial_compression: int
    temporal_compression: int
    causal: bool
    size_multiple: int
    latent_channels: int
    scale_factor: float
    shift_factor: float
    scaling: str

    def frames_ok(self, num_frames: int) -> bool:
        return frames_ok(num_frames, self.temporal_compression, self.causal)

    @property
    def frame_rule(self) -> str:
        return frame_rule(self.temporal_compression, self.causal)

    def valid_num_frames(self, at_most: int) -> int:
        """The largest frame count this model accepts that is at most `at_most` (0 if none)."""
        return valid_num_frames(at_most, self.temporal_compression, self.causal)

    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.temporal_compression, self.causal)

    def decoded_frames(self, num_latent_frames: int) -> int:
        return decoded_frames(num_latent_frames, self.temporal_compression, self.causal)


@dataclass(frozen=True)
class VAEFamily:
    """What one model family does: everything the shared code needs to ask of a family.

    Attributes:
        name: Family name, recorded in the output metadata (`autoencoder_2d`, `causal_3d`, ...).
        build: Builds the `nn.Module` from the preset's params (no weights loaded).
        load: `(preset, checkpoint, device, dtype, seed) -> model`, in eval mode, gradients off.
        check: `(preset, checkpoint)`: checks the weights' keys and shapes from the file headers.
        weights_sha256: Identity of a checkpoint (a file, or a model folder).
        variational: `encode` returns a Gaussian posterior (else it is deterministic).
        rules: Derives the shape and scaling constants from the params (None: given per preset).
        key_prefixes: Prefixes stripped from checkpoint keys before strict matching.
        source: Where the family's constants come from.
        opensora: The tiling Open-Sora's training configs run for this family; None for a
            family that never tiles (it runs whole under every tiling mode).
        temporal_split: How "auto" splits time: exact "chunks", or overlapped "tiles".
        temporal_tiles: Whether overlapped temporal tiles are allowed at all.
        encode_unit: Encodes a clip or a tile to what tiles are blended as: posterior parameters
            for variational families, scaled latents otherwise.
        encode_chunks: Like `encode_unit`, in exact temporal chunks of `plan.temporal_size`.
        decode_chunks: Decodes scaled latents in exact temporal chunks.
        stream_kv_channels: For chunked encoders that stream (each chunk sees what earlier ones
            left: conv caches, attention keys and values), the key/value channels held per
            latent position for the rest of the clip; None when chunks are independent.
    """

    name: str
    build: Callable[[Any], nn.Module]
    load: Callable[[VAEPreset, PathLike | None, torch.device | str, torch.dtype, int], nn.Module]
    check: Callable[[VAEPreset, PathLike | None], None]
    weights_sha256: Callable[[PathLike], str]
    variational: bool
    rules: Callable[[Any], LatentRules] | None = None
    key_prefixes: tuple[str, ...] = ()
    source: str = ""
    opensora: OpenSoraTiling | None = None
    temporal_split: Literal["chunks", "tiles"] = "chunks"
    temporal_tiles: bool = True
    encode_unit: Encoder | None = None
    encode_chunks: Chunked | None = None
    decode_chunks: Chunked | None = None
    stream_kv_channels: Callable[[Any], int] | None = None


@dataclass(frozen=True)
class VAEPreset(LatentRules):
    """Everything the job needs to know about one VAE configuration (made by `make_preset`):
    its `LatentRules` (compression, frames, sizes, scaling) and what identifies and builds it.

    Attributes:
        name: Registry name, used on the command line (`--vae NAME`).
        family: The model family and its behaviour.
        params: The family's architecture params dataclass.
        checkpoint: File name of the public checkpoint this preset loads ("" for none).
        key_prefixes: Prefixes stripped from checkpoint keys before strict matching.
        source: Where the constants come from.
        weights: A folder holding the preset's own weights and config (a diffusers model folder,
            `diffusers:PATH`): it stands in for `--checkpoint`, which is refused, and is what the
            job hashes as the checkpoint identity. "" for presets loaded from `--checkpoint`.
    """

    name: str
    family: VAEFamily
    params: Any
    checkpoint: str = ""
    key_prefixes: tuple[str, ...] = ()
    source: str = ""
    notes: str = field(default="", compare=False)
    weights: str = ""

    @property
    def variational(self) -> bool:
        return self.family.variational

    def build(self) -> nn.Module:
        """The model with random weights (under `torch.device("meta")`: with no storage at all)."""
        return self.family.build(self.params)

    def check_input(self, num_frames: int, height: int, width: int) -> None:
        """Raises ValueError, saying what would be accepted, if the model cannot take this shape."""
        tc, causal = self.temporal_compression, self.causal
        problems = shape_problems(num_frames, height, width, tc, causal, self.size_multiple)
        if problems:
            raise ValueError(f"VAE '{self.name}' cannot encode " + ", ".join(problems))

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, T', H', W')` of the latent for an input of the given size."""
        self.check_input(num_frames, height, width)
        sc = self.spatial_compression
        return (self.latent_channels, self.latent_frames(num_frames), height // sc, width // sc)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (used by `--list-vaes` and written into output metadata)."""
        return {
            "name": self.name,
            "family": self.family.name,
            "spatial_compression": self.spatial_compression,
            "temporal_compression": self.temporal_compression,
            "frames": self.frame_rule,
            "size_multiple": self.size_multiple,
            "latent_channels": self.latent_channels,
            "variational": self.variational,
            "scale_factor": self.scale_factor,
            "shift_factor": self.shift_factor,
            "scaling": self.scaling,
            "checkpoint": self.checkpoint,
            "params": asdict(self.params),
        }


def make_preset(
    family: VAEFamily,
    name: str,
    params: Any,
    *,
    rules: LatentRules | None = None,
    checkpoint: str = "",
    notes: str = "",
    source: str = "",
    weights: str = "",
) -> VAEPreset:
    """The one way a preset is made: the family's rules (or the given ones) fill in the constants."""
    if rules is None:
        if family.rules is None:
            raise ValueError(f"VAE family {family.name!r} derives no rules from params: give them")
        rules = family.rules(params)
    return VAEPreset(
        **dataclasses.asdict(rules),
        name=name,
        family=family,
        params=params,
        checkpoint=checkpoint,
        key_prefixes=family.key_prefixes,
        source=source or family.source,
        notes=notes,
        weights=weights,
    )


# The scaling of the FLUX AE and the causal 3D VAE (Open-Sora and diffusers agree on it).
AFFINE_SCALING = "latent = scale_factor * (z - shift_factor); z = latent / scale_factor + shift_factor"
