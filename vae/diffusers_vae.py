"""Any diffusers autoencoder behind this package's `encode` / `decode` (the model side of `diffusers:PATH`).

The stored latent is what the family's diffusers pipelines feed their transformer: the posterior
sample (or mode) `z`, normalised as the pipeline normalises it after `vae.encode` (the constants,
and the pipeline file each follows, come from `vae/diffusers_folder.py`). In one formula,
`latent = (z - mean) * scale_factor / std`, where `mean` and `std` are per-channel
(`latents_mean`, `latents_std`) or the scalars `shift_factor` and 1. diffusers, an optional
dependency (`pip install -e '.[diffusers]'`), is imported only to build or load a model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from vae.posterior import DiagonalGaussianDistribution

# AutoencoderKLWan, the newest class below, first shipped in 0.33 (0.32 lacks it: huggingface/diffusers#10963).
MIN_DIFFUSERS = (0, 33)
INSTALL_HINT = "diffusers VAEs need the optional diffusers>=0.33: pip install -e '.[diffusers]'"

# diffusers' memory-saving modes either blend overlapping tiles (other numbers than one pass) or
# only split the work; all go off, the project tiles on its own. HunyuanVideo turns framewise
# encoding on by default. Built into the forward passes, and so kept: Wan encodes 1 then 4 frames
# per call (decodes frame by frame) carrying a causal feature cache; CogVideoX encodes 8 frames
# per call (the first call takes the remainder) and decodes 2 latent frames per call, carrying a
# conv cache.
_MODES_OFF = ("use_tiling", "use_slicing", "use_framewise_encoding", "use_framewise_decoding")


@dataclass(frozen=True)
class DiffusersParams:
    """What builds a `DiffusersVAE` (the preset's `params`; recorded in `job.json`).

    Attributes:
        class_name: The diffusers class (`_class_name` of `config.json`).
        config: `config.json` without its private `_...` entries.
        scale_factor: Multiplier of the normalisation.
        shift_factor: Scalar mean subtracted first (0 when per-channel means are used).
        latents_mean: Per-channel means, or None.
        latents_std: Per-channel standard deviations, or None.
        fold_frames: A 2D model: frames are folded into the batch and encoded one by one.
    """

    class_name: str
    config: dict[str, Any]
    scale_factor: float
    shift_factor: float
    latents_mean: tuple[float, ...] | None
    latents_std: tuple[float, ...] | None
    fold_frames: bool


class DiffusersVAE(nn.Module):
    """A diffusers autoencoder behind the project's `encode` / `decode`.

    `encode` maps `B C T H W` in [-1, 1] to the normalised latent and the posterior over the raw
    latent `z`; `decode` inverts the normalisation and decodes. The posterior and the
    normalisation are computed in float32 whatever the model's dtype.
    """

    def __init__(self, model: nn.Module, params: DiffusersParams) -> None:
        super().__init__()
        self.model = model
        self.params = params
        for mode in _MODES_OFF:
            if hasattr(model, mode):
                setattr(model, mode, False)
        # Plain float32 tensors, not buffers: a bfloat16 model must not round the constants.
        shape = (1, -1, 1, 1, 1)
        mean = params.latents_mean if params.latents_mean is not None else (params.shift_factor,)
        std = params.latents_std if params.latents_std is not None else (1.0,)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(shape)
        self._std = torch.tensor(std, dtype=torch.float32).view(shape)

    def posterior(self, x: Tensor) -> DiagonalGaussianDistribution:
        """The posterior over raw latents, laid out `B C T' h w`."""
        t = x.shape[2]
        if self.params.fold_frames:
            x = rearrange(x, "b c t h w -> (b t) c h w")
        moments = self.model.encode(x).latent_dist.parameters
        if self.params.fold_frames:
            moments = rearrange(moments, "(b t) c h w -> b c t h w", t=t)
        return DiagonalGaussianDistribution(moments.float())

    def encode(
        self,
        x: Tensor,
        sample: bool = True,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Encodes video.

        Args:
            x: `B C T H W` in [-1, 1], in the model's dtype.
            sample: Draw from the posterior rather than take its mean.
            generator: For the sample: one generator, or one per batch item.

        Returns:
            The normalised latent (float32) and the posterior of the raw latent `z`.
        """
        posterior = self.posterior(x)
        return posterior.latent(self.normalise, sample, generator), posterior

    def normalise(self, z: Tensor) -> Tensor:
        mean, std = self._mean.to(z.device), self._std.to(z.device)
        return (z.float() - mean) * self.params.scale_factor / std

    def denormalise(self, latent: Tensor) -> Tensor:
        mean, std = self._mean.to(latent.device), self._std.to(latent.device)
        return latent.float() * std / self.params.scale_factor + mean

    def decode(self, latent: Tensor) -> Tensor:
        """Decodes a normalised latent `B C T' h w` to video `B C T H W`."""
        dtype = next(self.model.parameters()).dtype
        z = self.denormalise(latent).to(dtype)
        t = z.shape[2]
        if self.params.fold_frames:
            z = rearrange(z, "b c t h w -> (b t) c h w")
        extra = {}
        if getattr(self.model.config, "timestep_conditioning", False):
            # LTX-Video 0.9.1+ decoders take a timestep; 0 (and no added noise) is the pipelines' default.
            extra["temb"] = torch.zeros(z.shape[0], device=z.device, dtype=dtype)
        x = self.model.decode(z, **extra).sample
        if self.params.fold_frames:
            x = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        return x


def require_diffusers() -> None:
    """Raises ImportError with the install command unless a recent enough diffusers is importable."""
    try:
        found = importlib.util.find_spec("diffusers") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(INSTALL_HINT, name="diffusers")
    version = importlib.metadata.version("diffusers")
    if tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < MIN_DIFFUSERS:
        raise ImportError(f"{INSTALL_HINT} (found diffusers {version})", name="diffusers")


def model_class(class_name: str) -> type[nn.Module]:
    """The diffusers class (imports diffusers)."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"diffusers {diffusers.__version__} has no {class_name}; upgrade diffusers")
    return cls


def build_diffusers_vae(params: DiffusersParams) -> DiffusersVAE:
    """The model with random weights (the preset's `build`)."""
    return DiffusersVAE(model_class(params.class_name).from_config(params.config), params)
