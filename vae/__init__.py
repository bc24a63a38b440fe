"""Video VAEs used by Open-Sora: pure `nn.Module`s, presets and a safetensors loader.

Nothing here knows about Ray, tar files or Parquet.
"""

from vae.codec import decode_video, encode_video, estimate_bytes, plan_decode, plan_encode
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
from vae.tiling import TilePlan, TilingConfig

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "checkpoint_sha256",
    "DiagonalGaussianDistribution",
    "TilePlan",
    "TilingConfig",
    "VAEPreset",
    "decode_video",
    "encode_video",
    "estimate_bytes",
    "file_sha256",
    "get_preset",
    "list_presets",
    "load_vae",
    "plan_decode",
    "plan_encode",
    "read_state_dict",
    "register_preset",
    "resolve_name",
]
