"""Named VAE presets: architecture params plus the frame, size and scaling rules.

A preset is the single place where a model's constants live (compression ratios, latent
channels, allowed frame counts, size multiple, scale/shift). The job reads them from here
and records them in its output metadata; nothing else retypes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from vae.autoencoder_2d import AutoEncoder2D, AutoEncoder2DParams
from vae.causal_3d import AutoencoderKLCausal3D, Causal3DParams
from vae.dc_ae import DCAE, DCAEParams


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
        weights: A folder holding the preset's own weights and config (a diffusers model folder,
            `diffusers:PATH`): it stands in for `--checkpoint`, which is refused, and is what the
            job hashes as the checkpoint identity. "" for presets loaded from `--checkpoint`.
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
    weights: str = ""

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


# The scaling of the FLUX AE and the causal 3D VAE (Open-Sora and diffusers agree on it).
AFFINE_SCALING = "latent = scale_factor * (z - shift_factor); z = latent / scale_factor + shift_factor"


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
        scaling=AFFINE_SCALING,
        checkpoint=checkpoint,
        source="FLUX ae.safetensors config (black-forest-labs/flux); Open-Sora v2 autoencoder_2d",
        notes=notes,
    )


# Key prefixes of the HunyuanVideo / Open-Sora files. safetensors holds one flat dict, so a
# training checkpoint's wrapping dict (`state_dict`, `module` of DDP) or the pipeline's `vae`
# sub-model shows up as a key prefix; they are stripped repeatedly (`module.vae.x` -> `x`).
_HUNYUAN_PREFIXES = ("state_dict.", "module.", "vae.")


def _hunyuan(name: str, params: Causal3DParams, checkpoint: str, notes: str) -> VAEPreset:
    return VAEPreset(
        name=name,
        family="causal_3d",
        params=params,
        build=AutoencoderKLCausal3D,
        spatial_compression=params.spatial_compression_ratio,
        temporal_compression=params.time_compression_ratio,
        causal=True,
        size_multiple=params.spatial_compression_ratio,
        latent_channels=params.latent_channels,
        variational=True,
        scale_factor=params.scale_factor,
        shift_factor=params.shift_factor,
        scaling=AFFINE_SCALING,
        checkpoint=checkpoint,
        key_prefixes=_HUNYUAN_PREFIXES,
        source="HunyuanVideo AutoencoderKLCausal3D config (Tencent/HunyuanVideo); Open-Sora v2 hunyuan_vae; "
        "diffusers AutoencoderKLHunyuanVideo",
        notes=notes,
    )


def _dc_ae(name: str, params: DCAEParams, checkpoint: str, notes: str) -> VAEPreset:
    s = params.scaling_factor
    if s is None:
        scale, scaling = 1.0, "latent = z (no scaling)"
    else:
        # Open-Sora divides by its scaling_factor (= std(z)) on encode, the reverse of the
        # diffusers convention; in this preset's terms that is a multiplier of 1 / scaling_factor.
        scale = 1.0 / s
        scaling = (
            f"latent = z / scaling_factor; z = latent * scaling_factor (Open-Sora convention, "
            f"scaling_factor = {s}, i.e. scale_factor = 1/{s}, shift_factor = 0)"
        )
    return VAEPreset(
        name=name,
        family="dc_ae",
        params=params,
        build=DCAE,
        spatial_compression=params.spatial_compression,
        temporal_compression=params.temporal_compression,
        causal=False,
        size_multiple=params.spatial_compression,
        latent_channels=params.latent_channels,
        variational=False,
        scale_factor=scale,
        shift_factor=0.0,
        scaling=scaling,
        checkpoint=checkpoint,
        source="Open-Sora v2 opensora/models/dc_ae (zoo entry dc-ae-f32t4c128); "
        "scaling from configs/diffusion/train/high_compression.py",
        notes=notes,
    )


# The scaling the stored latents carry is what Open-Sora's trainer is configured to feed its DC-AE
# diffusion model: configs/diffusion/train/high_compression.py (the one diffusion config on this
# VAE) sets scaling_factor=0.493, so latents are z / 0.493, about unit std (the maintainers define
# the factor as std(z), hpcaitech/Open-Sora#838). Two parts of the release disagree, recorded in
# the notes: configs/diffusion/inference/high_compression.py leaves the factor unset, and
# scripts/diffusion/train.py replaces `encode` with the bare encoder, skipping the factor (for
# the Hunyuan VAE that line would feed 32-channel posterior moments, so it reads as a bug).
_DC_AE_SCALING = 0.493
_DC_AE_NOTES = (
    "Open-Sora v2 Video DC-AE (F32T4C128_AE.safetensors); 459.5M params, deterministic. "
    "Stored latents are z / 0.493 as configured by Open-Sora's high_compression training config; "
    "Open-Sora's inference config decodes without the factor and its released train.py calls the "
    "bare encoder (no factor): multiply by 0.493 to get raw z."
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
        _hunyuan(
            "hunyuan-vae",
            Causal3DParams(),
            "hunyuan_vae.safetensors",
            "HunyuanVideo causal 3D VAE (Open-Sora v2 'hunyuan_vae'); 246.5M params; frames 1+4k.",
        ),
        _hunyuan(
            "hunyuan-vae-tiny",
            # Same architecture and constants, narrow and shallow: for CPU tests. 32 groups
            # still divide every width.
            Causal3DParams(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
            "",
            "Narrow causal 3D VAE for CPU tests (random weights).",
        ),
        _dc_ae(
            "dc-ae-f32t4c128",
            DCAEParams(scaling_factor=_DC_AE_SCALING),
            "F32T4C128_AE.safetensors",
            _DC_AE_NOTES,
        ),
        _dc_ae(
            "dc-ae-tiny",
            # Same architecture and constants, narrow and shallow: for CPU tests (the golden
            # fixture in tests/fixtures/dc_ae was made with the reference code at these sizes).
            # The attention stages stay at >= 32 channels (one 32-dim head); stage 4->5 changes
            # width across a temporal step, as the full model's 3->4 does.
            DCAEParams(
                latent_channels=16,
                widths=(8, 8, 16, 32, 32, 64),
                encoder_depths=(1, 2, 1, 1, 1, 1),
                decoder_depths=(2, 1, 1, 1, 1, 1),
                scaling_factor=_DC_AE_SCALING,
            ),
            "",
            "Narrow video DC-AE for CPU tests (random weights or the golden fixture's).",
        ),
    )
}


# `--vae diffusers:PATH`: a preset made on the fly from a local diffusers model folder.
DIFFUSERS_PREFIX = "diffusers:"
DIFFUSERS_FAMILY = "diffusers"


def get_preset(name: str) -> VAEPreset:
    """Looks up a preset by name, with the known names in the error.

    `diffusers:PATH` builds the preset of a local diffusers model folder (see `vae.diffusers_vae`).
    """
    if name.startswith(DIFFUSERS_PREFIX):
        from vae.diffusers_vae import diffusers_preset  # reads config.json; diffusers itself is not imported

        return diffusers_preset(name[len(DIFFUSERS_PREFIX) :])
    try:
        return _PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(_PRESETS))
        raise KeyError(f"unknown VAE '{name}'; known: {known}, or {DIFFUSERS_PREFIX}PATH (a model folder)") from None


def resolve_name(name: str) -> str:
    """`name` as another process (a worker, maybe in another directory) must be given it.

    The folder of `diffusers:PATH` becomes absolute; preset names are returned unchanged.
    """
    if name.startswith(DIFFUSERS_PREFIX):
        return DIFFUSERS_PREFIX + os.path.abspath(os.path.expanduser(name[len(DIFFUSERS_PREFIX) :]))
    return name


def list_presets() -> list[VAEPreset]:
    return [_PRESETS[n] for n in sorted(_PRESETS)]


def register_preset(preset: VAEPreset) -> None:
    """Adds a preset (model families register theirs; tests may add tiny variants)."""
    if preset.name in _PRESETS and _PRESETS[preset.name] != preset:
        raise ValueError(f"a different preset named '{preset.name}' is already registered")
    _PRESETS[preset.name] = preset
