"""Video VAEs used by Open-Sora: pure `nn.Module`s, presets and a safetensors loader.

Nothing here knows about Ray, tar files or Parquet.
"""

from vae.loading import (
    CheckpointError,
    check_checkpoint,
    checkpoint_sha256,
    file_sha256,
    load_vae,
    read_state_dict,
)
from vae.posterior import DiagonalGaussianDistribution
from vae.presets import VAEPreset, get_preset, list_presets, register_preset, resolve_name

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "checkpoint_sha256",
    "DiagonalGaussianDistribution",
    "VAEPreset",
    "file_sha256",
    "get_preset",
    "list_presets",
    "load_vae",
    "read_state_dict",
    "register_preset",
    "resolve_name",
]
