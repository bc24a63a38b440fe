"""Named VAE presets: architecture params plus the frame, size and scaling rules.

A preset is the single place where a model's constants live (compression ratios, latent
channels, allowed frame counts, size multiple, scale/shift). The job reads them from here
and records them in its output metadata; nothing else retypes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from vae.autoencoder_2d import AutoEncoder2D, AutoEncoder2DParams


@dataclass(frozen=True)
class VAEPreset:
    """Everything the job needs to know about one VAE configuration.

    Attributes:
        name: Registry name, used on the command line (`--vae NAME`).
        family: Model family (`autoencoder_2d`, ...).
        params: The family's architecture params dataclass.
        build: Builds the `nn.Module` from `params` (no weights loaded).
        spatial_compression: Input pixels per latent pixel along H and W.
        temporal_compression: Input frames per latent frame (1 for frame-by-frame models).
        causal: Temporal causality; a causal model takes `1 + k * temporal_compression` frames.
        size_multiple: H and W must be multiples of this.
        latent_channels: Channels of the stored latent.
        variational: Whether `encode` has a Gaussian posterior (else it is deterministic).
        scale_factor: Multiplier applied by `encode` (see `scaling`).
        shift_factor: Offset applied by `encode` (see `scaling`).
        scaling: The formula `encode` applies to the raw latent `z`, spelled out so that the
            stored latents can never be rescaled the wrong way round.
        checkpoint: File name of the public checkpoint this preset loads ("" for none).
        key_prefixes: Prefixes stripped from checkpoint keys before strict matching.
        source: Where the constants come from.
    """

    name: str
    family: str
    params: Any
    build: Callable[[Any], nn.Module]
    spatial_compression: int
    temporal_compression: int
    causal: bool
    size_multiple: int
    latent_channels: int
    variational: bool
    scale_factor: float
    shift_factor: float
    scaling: str
    checkpoint: str = ""
    key_prefixes: tuple[str, ...] = ()
    source: str = ""
    notes: str = field(default="", compare=False)

    def frames_ok(self, num_frames: int) -> bool:
        if num_frames < 1:
            return False
        tc = self.temporal_compression
        if tc == 1:
            return True
        if self.causal:
            return (num_frames - 1) % tc == 0
        return num_frames == 1 or num_frames % tc == 0

    @property
    def frame_rule(self) -> str:
        tc = self.temporal_compression
        if tc == 1:
            return "any"
        return f"1+{tc}k" if self.causal else f"1 or {tc}k"

    def valid_num_frames(self, at_most: int) -> int:
        """The largest frame count this model accepts that is at most `at_most` (0 if none)."""
        return next((t for t in range(at_most, 0, -1) if self.frames_ok(t)), 0)

    def check_input(self, num_frames: int, height: int, width: int) -> None:
        """Raises ValueError, saying what would be accepted, if the model cannot take this shape."""
        problems = []
        if not self.frames_ok(num_frames):
            near = self.valid_num_frames(num_frames)
            problems.append(
                f"{num_frames} frames (the rule is T = {self.frame_rule}"
                + (f"; e.g. {near} or {near + self.temporal_compression})" if near else ")")
            )
        m = self.size_multiple
        for label, size in (("height", height), ("width", width)):
            if size < m or size % m:
                problems.append(f"{label} {size} (must be a positive multiple of {m})")
        if problems:
            raise ValueError(f"VAE '{self.name}' cannot encode " + ", ".join(problems))

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, T', H', W')` of the latent for an input of the given size."""
        self.check_input(num_frames, height, width)
        tc, sc = self.temporal_compression, self.spatial_compression
        if tc == 1:
            t = num_frames
        elif self.causal:
            t = (num_frames - 1) // tc + 1
        else:
            t = max(1, num_frames // tc)
        return (self.latent_channels, t, height // sc, width // sc)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (used by `--list-vaes` and written into output metadata)."""
        return {
            "name": self.name,
            "family": self.family,
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


def _flux(name: str, params: AutoEncoder2DParams, checkpoint: str, notes: str) -> VAEPreset:
    return VAEPreset(
        name=name,
        family="autoencoder_2d",
        params=params,
        build=AutoEncoder2D,
        spatial_compression=2 ** (len(params.ch_mult) - 1),
        temporal_compression=1,
        causal=False,
        size_multiple=2 ** (len(params.ch_mult) - 1),
        latent_channels=params.z_channels,
        variational=True,
        scale_factor=params.scale_factor,
        shift_factor=params.shift_factor,
        scaling="latent = scale_factor * (z - shift_factor); z = latent / scale_factor + shift_factor",
        checkpoint=checkpoint,
        source="FLUX ae.safetensors config (black-forest-labs/flux); Open-Sora v2 autoencoder_2d",
        notes=notes,
    )


_PRESETS: dict[str, VAEPreset] = {
    p.name: p
    for p in (
        _flux(
            "flux-ae",
            AutoEncoder2DParams(),
            "ae.safetensors",
            "FLUX.1 autoencoder (Open-Sora v2 'autoencoder_2d', flux1-dev-ae.safetensors); 83.8M params.",
        ),
        _flux(
            "flux-ae-tiny",
            # Same architecture and constants, narrow and shallow: for CPU tests and the demo.
            # A quarter of the width with a quarter of the groups keeps FLUX's channels per group.
            AutoEncoder2DParams(ch=32, num_res_blocks=1, norm_groups=8),
            "",
            "Narrow FLUX-AE for CPU tests and the demo (random or demo-trained weights).",
        ),
    )
}


def get_preset(name: str) -> VAEPreset:
    """Looks up a preset by name, with the known names in the error."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown VAE '{name}'; known: {', '.join(sorted(_PRESETS))}") from None


def list_presets() -> list[VAEPreset]:
    return [_PRESETS[n] for n in sorted(_PRESETS)]


def register_preset(preset: VAEPreset) -> None:
    """Adds a preset (model families register theirs; tests may add tiny variants)."""
    if preset.name in _PRESETS and _PRESETS[preset.name] != preset:
        raise ValueError(f"a different preset named '{preset.name}' is already registered")
    _PRESETS[preset.name] = preset
