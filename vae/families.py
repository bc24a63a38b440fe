"""The three Open-Sora VAE families: how each is built, loaded, scaled and split.

Each `VAEFamily` ties a model module to what the shared code asks of it (see `vae.spec`):
the shape and scaling rules it derives from its params, the tiling Open-Sora's training
configs run for it, which temporal splits are exact, what one tile encodes to, and what a
streaming encode keeps in memory.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from vae.autoencoder_2d import AutoEncoder2D, AutoEncoder2DParams
from vae.causal_3d import AutoencoderKLCausal3D, Causal3DParams
from vae.causal_3d_stream import stream_decode, stream_encode
from vae.checkpoint import file_sha256
from vae.dc_ae import DCAE, DCAEParams
from vae.loading import check_native, load_native
from vae.spec import AFFINE_SCALING, LatentRules, OpenSoraTiling, TilePlan, VAEFamily
from vae.tiling import in_frame_chunks

# What Open-Sora's training configs run, so that stored latents are what its trainer would get.
# causal_3d: configs/diffusion/train/image.py (and the stage configs built on it) sets
#   use_spatial_tiling=True, use_temporal_tiling=False on `hunyuan_vae`, whose defaults are
#   sample_size=256, sample_tsize=64, tile_overlap_factor=0.25.
# dc_ae: configs/diffusion/train/high_compression.py sets spatial and temporal tiling with
#   spatial_tile_size=256, temporal_tile_size=32, tile_overlap_factor=0.25.
# autoencoder_2d: Open-Sora's FLUX AE has no tiling; frames are encoded as one batch.


# Loaded from one safetensors file (`--checkpoint`), built on the meta device, keys matched strictly.
_ONE_FILE = {"load": load_native, "check": check_native, "weights_sha256": file_sha256}


# -- the FLUX AE (frame by frame) ---------------------------------------------------------------


def _flux_rules(p: AutoEncoder2DParams) -> LatentRules:
    factor = 2 ** (len(p.ch_mult) - 1)
    return LatentRules(
        spatial_compression=factor,
        temporal_compression=1,
        causal=False,
        size_multiple=factor,
        latent_channels=p.z_channels,
        scale_factor=p.scale_factor,
        shift_factor=p.shift_factor,
        scaling=AFFINE_SCALING,
    )


def _flux_moments(model: nn.Module, x: Tensor) -> Tensor:
    """The posterior parameters of every frame (frames folded into the batch)."""
    moments = model.encoder(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(moments, "(b t) c h w -> b c t h w", b=x.shape[0])


FLUX_AE = VAEFamily(
    name="autoencoder_2d",
    build=AutoEncoder2D,
    **_ONE_FILE,
    variational=True,
    rules=_flux_rules,
    source="FLUX ae.safetensors config (black-forest-labs/flux); Open-Sora v2 autoencoder_2d",
    opensora=OpenSoraTiling(spatial=False, temporal=False, spatial_tile=256, temporal_tile=32, overlap=0.25),
    temporal_split="chunks",  # frames are independent: any chunk of frames is exact
    temporal_tiles=False,
    encode_unit=_flux_moments,
    encode_chunks=lambda model, x, plan: in_frame_chunks(lambda t: _flux_moments(model, t), x, plan.temporal_size),
    decode_chunks=lambda model, z, plan: in_frame_chunks(model.decode, z, plan.temporal_size),
)


# -- the HunyuanVideo causal 3D VAE -------------------------------------------------------------


def _causal_rules(p: Causal3DParams) -> LatentRules:
    return LatentRules(
        spatial_compression=p.spatial_compression_ratio,
        temporal_compression=p.time_compression_ratio,
        causal=True,
        size_multiple=p.spatial_compression_ratio,
        latent_channels=p.latent_channels,
        scale_factor=p.scale_factor,
        shift_factor=p.shift_factor,
        scaling=AFFINE_SCALING,
    )


def _causal_stream_encode(model: nn.Module, x: Tensor, plan: TilePlan) -> Tensor:
    return stream_encode(model, x, plan.temporal_size, plan.norm, plan.norm_passes)


def _causal_stream_decode(model: nn.Module, latent: Tensor, plan: TilePlan) -> Tensor:
    return stream_decode(model, latent, plan.temporal_size, plan.norm, plan.norm_passes)


def _causal_kv_channels(p: Causal3DParams) -> int:
    # The mid-block attention keeps the keys and values of every earlier frame (vae/causal_3d_stream.py).
    return p.block_out_channels[-1] if p.mid_block_add_attention else 0


# Key prefixes of the HunyuanVideo / Open-Sora files. safetensors holds one flat dict, so a
# training checkpoint's wrapping dict (`state_dict`, `module` of DDP) or the pipeline's `vae`
# sub-model shows up as a key prefix; they are stripped repeatedly (`module.vae.x` -> `x`).
CAUSAL_3D = VAEFamily(
    name="causal_3d",
    build=AutoencoderKLCausal3D,
    **_ONE_FILE,
    variational=True,
    rules=_causal_rules,
    key_prefixes=("state_dict.", "module.", "vae."),
    source="HunyuanVideo AutoencoderKLCausal3D config (Tencent/HunyuanVideo); Open-Sora v2 hunyuan_vae; "
    "diffusers AutoencoderKLHunyuanVideo",
    opensora=OpenSoraTiling(spatial=True, temporal=False, spatial_tile=256, temporal_tile=64, overlap=0.25),
    temporal_split="chunks",  # streaming: causal convs and attention carry state from chunk to chunk
    encode_unit=lambda model, x: model.quant_conv(model.encoder(x)),
    encode_chunks=_causal_stream_encode,
    decode_chunks=_causal_stream_decode,
    stream_kv_channels=_causal_kv_channels,
)


# -- Open-Sora's video DC-AE --------------------------------------------------------------------


def _dc_ae_rules(p: DCAEParams) -> LatentRules:
    s = p.scaling_factor
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
    return LatentRules(
        spatial_compression=p.spatial_compression,
        temporal_compression=p.temporal_compression,
        causal=False,
        size_multiple=p.spatial_compression,
        latent_channels=p.latent_channels,
        scale_factor=scale,
        shift_factor=0.0,
        scaling=scaling,
    )


DC_AE = VAEFamily(
    name="dc_ae",
    build=DCAE,
    **_ONE_FILE,
    variational=False,
    rules=_dc_ae_rules,
    source="Open-Sora v2 opensora/models/dc_ae (zoo entry dc-ae-f32t4c128); "
    "scaling from configs/diffusion/train/high_compression.py",
    opensora=OpenSoraTiling(spatial=True, temporal=True, spatial_tile=256, temporal_tile=32, overlap=0.25),
    temporal_split="tiles",  # its linear attention spans the clip: no exact chunks, overlapped tiles
    encode_unit=lambda model, x: model.encode(x)[0],  # scaled latents: Open-Sora scales each tile
)
