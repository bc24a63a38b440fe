"""Video VAEs used by Open-Sora: pure `nn.Module`s, their presets, tiling, and a safetensors loader.

Nothing here knows about Ray, tar files or Parquet. The modules, from the bottom up:

    spec.py, errors.py        what a VAE is, as data (preset, family, shape rules, tiling plans); errors
    checkpoint.py             reading safetensors files: tensors, header shapes, key checks, sha256
    posterior.py              the diagonal Gaussian posterior (sample or mode, then scale)
    autoencoder_2d.py, causal_3d.py (+ causal_3d_stream.py), dc_ae.py (+ dc_ae_blocks.py)
                              the three Open-Sora families' models
    diffusers_vae.py          any diffusers autoencoder behind the same encode/decode
    tiling.py, memory.py, codec.py
                              running tile plans, memory tracing, and the planning entry points
    loading.py, families.py, diffusers_folder.py
                              each family's load/check/split behaviour (`VAEFamily`)
    registry.py               every preset by name, `diffusers:PATH`, `load_vae`
"""

from vae.codec import (
    channels_last,
    channels_last_input,
    compile_encoder,
    decode_video,
    encode_video,
    estimate_bytes,
    plan_decode,
    plan_encode,
)
from vae.errors import CheckpointError, describe_error
from vae.posterior import DiagonalGaussianDistribution
from vae.registry import (
    check_checkpoint,
    get_preset,
    list_presets,
    load_vae,
    resolve_name,
    weights_path,
    weights_sha256,
)
from vae.spec import TilePlan, TilingConfig, VAEFamily, VAEPreset

__all__ = [
    "CheckpointError",
    "DiagonalGaussianDistribution",
    "TilePlan",
    "TilingConfig",
    "VAEFamily",
    "VAEPreset",
    "channels_last",
    "channels_last_input",
    "check_checkpoint",
    "compile_encoder",
    "decode_video",
    "describe_error",
    "encode_video",
    "estimate_bytes",
    "get_preset",
    "list_presets",
    "load_vae",
    "plan_decode",
    "plan_encode",
    "resolve_name",
    "weights_path",
    "weights_sha256",
]
