"""Every VAE this package knows by name, `diffusers:PATH`, and loading any of them.

    preset = get_preset("hunyuan-vae")
    model = load_vae(preset, "weights/hunyuan_vae.safetensors", device="cuda", dtype=torch.bfloat16)

The named presets are Open-Sora's three families at full size, plus narrow `-tiny` variants of
the same architectures for CPU tests and the demo. `diffusers:PATH` makes a preset on the fly
from a local diffusers model folder (`vae/diffusers_folder.py`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from vae.autoencoder_2d import AutoEncoder2DParams
from vae.causal_3d import Causal3DParams
from vae.dc_ae import DCAEParams
from vae.diffusers_folder import DIFFUSERS_PREFIX, diffusers_preset
from vae.families import CAUSAL_3D, DC_AE, FLUX_AE
from vae.spec import VAEPreset, make_preset

RANDOM_INIT = "random-init-seed-"  # the checkpoint identity of seeded random weights

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
        make_preset(
            FLUX_AE,
            "flux-ae",
            AutoEncoder2DParams(),
            checkpoint="ae.safetensors",
            notes="FLUX.1 autoencoder (Open-Sora v2 'autoencoder_2d', flux1-dev-ae.safetensors); 83.8M params.",
        ),
        make_preset(
            FLUX_AE,
            "flux-ae-tiny",
            # Same architecture and constants, narrow and shallow: for CPU tests and the demo.
            # A quarter of the width with a quarter of the groups keeps FLUX's channels per group.
            AutoEncoder2DParams(ch=32, num_res_blocks=1, norm_groups=8),
            notes="Narrow FLUX-AE for CPU tests and the demo (random or demo-trained weights).",
        ),
        make_preset(
            CAUSAL_3D,
            "hunyuan-vae",
            Causal3DParams(),
            checkpoint="hunyuan_vae.safetensors",
            notes="HunyuanVideo causal 3D VAE (Open-Sora v2 'hunyuan_vae'); 246.5M params; frames 1+4k.",
        ),
        make_preset(
            CAUSAL_3D,
            "hunyuan-vae-tiny",
            # Same architecture and constants, narrow and shallow: for CPU tests. 32 groups
            # still divide every width.
            Causal3DParams(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
            notes="Narrow causal 3D VAE for CPU tests (random weights).",
        ),
        make_preset(
            DC_AE,
            "dc-ae-f32t4c128",
            DCAEParams(scaling_factor=_DC_AE_SCALING),
            checkpoint="F32T4C128_AE.safetensors",
            notes=_DC_AE_NOTES,
        ),
        make_preset(
            DC_AE,
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
            notes="Narrow video DC-AE for CPU tests (random weights or the golden fixture's).",
        ),
    )
}


def get_preset(name: str) -> VAEPreset:
    """Looks up a preset by name, with the known names in the error.

    `diffusers:PATH` builds the preset of a local diffusers model folder from its `config.json`
    (diffusers itself is not imported).

    Raises:
        KeyError: An unknown name.
        ImportError, FileNotFoundError, ValueError, CheckpointError: A diffusers folder that
            cannot be used (see `vae.diffusers_folder.diffusers_preset`).
    """
    if name.startswith(DIFFUSERS_PREFIX):
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


def _preset(name: str | VAEPreset) -> VAEPreset:
    return get_preset(name) if isinstance(name, str) else name


def load_vae(
    name: str | VAEPreset,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """Builds the preset's model, in eval mode with gradients off.

    Args:
        name: A preset name or preset.
        checkpoint: A safetensors file whose keys match the model exactly (after stripping
            the preset's known prefixes). Without one the weights are random, drawn from a
            fixed `seed` so that every worker of a job gets the same model. A diffusers preset
            loads its folder instead, and refuses a checkpoint.
        device: Where the weights go.
        dtype: Parameter dtype.
        seed: Seed of the random initialisation when there is no checkpoint.

    Raises:
        FileNotFoundError: The checkpoint does not exist.
        CheckpointError: The file is not safetensors, or its keys or shapes do not match.
    """
    preset = _preset(name)
    return preset.family.load(preset, checkpoint, device, dtype, seed)


def check_checkpoint(name: str | VAEPreset, checkpoint: str | os.PathLike[str] | None = None) -> None:
    """Checks a checkpoint's keys and shapes against a preset, reading only the file headers.

    Without a checkpoint there is nothing to check (random weights), except for a diffusers
    preset, whose folder is checked instead.

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: As `load_vae` would.
    """
    preset = _preset(name)
    preset.family.check(preset, checkpoint)


def weights_path(preset: VAEPreset, checkpoint: str | os.PathLike[str] | None) -> str | None:
    """The weights a job loads: the checkpoint, or the preset's own folder (diffusers), or None (random)."""
    path = checkpoint or preset.weights or None
    return None if path is None else os.fspath(path)


def weights_sha256(preset: VAEPreset, checkpoint: str | os.PathLike[str] | None, seed: int) -> str:
    """The identity of the weights, recorded with every latent: the SHA-256 of the checkpoint
    (of a model folder, for diffusers), or `random-init-seed-<seed>` for seeded random weights."""
    path = weights_path(preset, checkpoint)
    return preset.family.weights_sha256(path) if path else f"{RANDOM_INIT}{seed}"
