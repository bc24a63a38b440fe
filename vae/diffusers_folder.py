"""A local diffusers model folder as a VAE of this package: `--vae diffusers:PATH`.

    python -m jobs.precompute --input 'data/shard-{000000..000099}.tar' --output out/ \\
        --vae diffusers:/models/Wan2.1-T2V-1.3B-Diffusers/vae

The folder is what `save_pretrained` writes: `config.json` and `diffusion_pytorch_model.safetensors`
(or its shards). The preset is built from `config.json` (and, for LTX-Video, the two normalisation
tensors in the weights) without importing diffusers; the normalisation of each supported class is
written out in `_CLASSES` with the pipeline file it follows. The folder is also the checkpoint:
its identity is a hash of its config and weights, and it loads with `from_pretrained`, local
files only, safetensors only, every key matched.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch

from vae.checkpoint import PICKLE_SUFFIXES, check_keys, file_sha256, read_shapes, read_tensors
from vae.diffusers_vae import DiffusersParams, DiffusersVAE, build_diffusers_vae, model_class, require_diffusers
from vae.errors import CheckpointError, describe_error
from vae.spec import AFFINE_SCALING, LatentRules, VAEFamily, VAEPreset, make_preset

DIFFUSERS_PREFIX = "diffusers:"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


# ---------------------------------------------------------------------------------------
# The supported classes: compression, channels and normalisation, read from config.json


@dataclass(frozen=True)
class _Rules:
    temporal: int
    spatial: int
    channels: int
    scale: float
    shift: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pipeline: str = ""  # the diffusers file whose normalisation is followed
    fold_frames: bool = False


class _Config:
    """`config.json` of one folder; a key it lacks takes the diffusers class's default, as `from_pretrained` does."""

    def __init__(self, class_name: str, data: dict[str, Any], folder: Path, weights: list[Path]) -> None:
        self.class_name = class_name
        self.data = data
        self.folder = folder
        self.weights = weights

    def __getitem__(self, key: str) -> Any:
        if key in self.data:
            return self.data[key]
        # Only configs written by older diffusers lack keys; the class signature holds the default.
        parameter = inspect.signature(model_class(self.class_name).__init__).parameters.get(key)
        return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    def check(self, key: str, derived: int) -> int:
        """Returns `derived` (from the architecture), refusing a config field that says otherwise."""
        declared = self[key]
        if declared is not None and int(declared) != derived:
            raise ValueError(
                f"{self.folder / CONFIG_FILE}: {key} = {declared}, but the architecture gives {derived}; "
                "the config is inconsistent"
            )
        return derived

    def per_channel(self, mean: Any, std: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if mean is None or std is None or len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"{self.folder}: {self.class_name} needs latents_mean and latents_std of {channels} values each"
            )
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _autoencoder_kl(c: _Config) -> _Rules:
    spatial = 2 ** (len(c["block_out_channels"]) - 1)
    common = {"temporal": 1, "spatial": spatial, "channels": c["latent_channels"], "fold_frames": True}
    scale, shift = float(c["scaling_factor"]), c["shift_factor"]
    if c["latents_mean"] is not None or c["latents_std"] is not None:
        if shift is not None:  # no pipeline uses both: which one would the trainer follow?
            raise ValueError(f"{c.folder}: AutoencoderKL config sets both shift_factor and latents_mean/std")
        mean, std = c.per_channel(c["latents_mean"], c["latents_std"], c["latent_channels"])
        pipeline = "pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py"
        return _Rules(**common, scale=scale, mean=mean, std=std, pipeline=pipeline)
    if shift is not None:  # SD3, FLUX
        return _Rules(**common, scale=scale, shift=float(shift), pipeline="pipelines/flux/pipeline_flux_img2img.py")
    return _Rules(**common, scale=scale, pipeline="pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py")


def _wan(c: _Config) -> _Rules:
    temporal = 2 ** sum(c["temperal_downsample"])
    if temporal != 4:  # AutoencoderKLWan._encode steps through the frames 1 + 4 + 4 + ...
        raise ValueError(f"{c.folder}: AutoencoderKLWan with {temporal}x temporal compression (only 4x is supported)")
    spatial = 2 ** (len(c["dim_mult"]) - 1) * (c["patch_size"] or 1)
    channels = c["z_dim"]
    mean, std = c.per_channel(c["latents_mean"], c["latents_std"], channels)
    return _Rules(
        temporal=c.check("scale_factor_temporal", temporal),
        spatial=c.check("scale_factor_spatial", spatial),
        channels=channels,
        scale=1.0,  # the pipelines compute (z - mean) * (1 / std)
        mean=mean,
        std=std,
        pipeline="pipelines/wan/pipeline_wan_video2video.py",
    )


# LTX-Video down blocks: stride (T, H, W) of each kind of downsampler.
_LTX_STRIDES = {"conv": (2, 2), "spatiotemporal": (2, 2), "spatial": (1, 2), "temporal": (2, 1)}


def _ltx(c: _Config) -> _Rules:
    if not c["encoder_causal"] or c["patch_size_t"] != 1:
        raise ValueError(f"{c.folder}: only causal LTX-Video encoders without temporal patches are supported")
    kinds = []
    for i, (block, scaled) in enumerate(zip(c["down_block_types"], c["spatio_temporal_scaling"])):
        if scaled:  # the 0.9.0 block always downsamples 2x2x2; the 0.9.5 block by its downsample_type
            kinds.append(c["downsample_type"][i] if block == "LTXVideo095DownBlock3D" else "conv")
    temporal = prod(_LTX_STRIDES[k][0] for k in kinds)
    spatial = c["patch_size"] * prod(_LTX_STRIDES[k][1] for k in kinds)
    channels = c["latent_channels"]
    # latents_mean / latents_std are buffers in the weights, not config entries.
    mean, std = c.per_channel(*_read_tensors(c.weights, ("latents_mean", "latents_std")), channels)
    return _Rules(
        temporal=c.check("temporal_compression_ratio", temporal),
        spatial=c.check("spatial_compression_ratio", spatial),
        channels=channels,
        scale=float(c["scaling_factor"]),
        mean=mean,
        std=std,
        pipeline="pipelines/ltx/pipeline_ltx.py (_normalize_latents)",
    )


def _cogvideox(c: _Config) -> _Rules:
    # The pipelines ignore shift_factor and latents_mean/std for this class; invert_scale_latents
    # concerns only the image-conditioning latents of CogVideoX image-to-video.
    return _Rules(
        temporal=int(c["temporal_compression_ratio"]),
        spatial=2 ** (len(c["block_out_channels"]) - 1),
        channels=c["latent_channels"],
        scale=float(c["scaling_factor"]),
        pipeline="pipelines/cogvideo/pipeline_cogvideox_video2video.py",
    )


def _hunyuan_video(c: _Config) -> _Rules:
    return _Rules(
        temporal=c["temporal_compression_ratio"],
        spatial=c["spatial_compression_ratio"],
        channels=c["latent_channels"],
        scale=float(c["scaling_factor"]),
        pipeline="pipelines/hunyuan_video/pipeline_hunyuan_video_image2video.py",
    )


def _mochi(c: _Config) -> _Rules:
    channels = c["latent_channels"]
    common = {
        "temporal": prod(c["temporal_expansions"]),
        "spatial": prod(c["spatial_expansions"]),
        "channels": channels,
        "scale": float(c["scaling_factor"]),
        "pipeline": "pipelines/mochi/pipeline_mochi.py (the inverse of its decode step)",
    }
    if c["latents_mean"] is None and c["latents_std"] is None:
        return _Rules(**common)
    mean, std = c.per_channel(c["latents_mean"], c["latents_std"], channels)
    return _Rules(**common, mean=mean, std=std)


_CLASSES: dict[str, Callable[[_Config], _Rules]] = {
    "AutoencoderKL": _autoencoder_kl,
    "AutoencoderKLCogVideoX": _cogvideox,
    "AutoencoderKLHunyuanVideo": _hunyuan_video,
    "AutoencoderKLLTXVideo": _ltx,
    "AutoencoderKLMochi": _mochi,
    "AutoencoderKLWan": _wan,
}
SUPPORTED_CLASSES = tuple(sorted(_CLASSES))


# ---------------------------------------------------------------------------------------
# The folder: preset, weights, identity, loading


def diffusers_preset(path: str | os.PathLike[str]) -> VAEPreset:
    """The preset of a diffusers model folder, from its `config.json` (diffusers is not imported).

    Raises:
        ImportError: diffusers is not installed (or too old).
        FileNotFoundError: No folder or no `config.json` in it.
        ValueError: An unsupported class or an inconsistent config.
        CheckpointError: No safetensors weights (e.g. only a pickle `.bin`).
    """
    require_diffusers()
    folder = model_folder(path)
    data = json.loads((folder / CONFIG_FILE).read_text())
    class_name = data.get("_class_name")
    if class_name not in _CLASSES:
        raise ValueError(
            f"{folder / CONFIG_FILE}: diffusers class {class_name!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_CLASSES)}"
        )
    weights = weight_files(folder)
    rules = _CLASSES[class_name](_Config(class_name, data, folder, weights))
    params = DiffusersParams(
        class_name=class_name,
        config={k: v for k, v in data.items() if not k.startswith("_")},
        scale_factor=rules.scale,
        shift_factor=rules.shift,
        latents_mean=rules.mean,
        latents_std=rules.std,
        fold_frames=rules.fold_frames,
    )
    label = f"{folder.parent.name}/{folder.name}" if folder.name == "vae" else folder.name  # a pipeline's vae/
    return make_preset(
        DIFFUSERS,
        f"{DIFFUSERS_PREFIX}{class_name}:{label}",
        params,
        rules=LatentRules(
            spatial_compression=rules.spatial,
            temporal_compression=rules.temporal,
            causal=rules.temporal > 1,  # every supported video class takes 1 + k * temporal frames
            size_multiple=rules.spatial,
            latent_channels=rules.channels,
            scale_factor=rules.scale,
            shift_factor=rules.shift,
            scaling=_formula(rules),
        ),
        checkpoint=label,
        weights=str(folder),
        source=f"diffusers {class_name} folder {folder}; normalisation of diffusers {rules.pipeline}",
    )


def _formula(r: _Rules) -> str:
    where = f" (as diffusers {r.pipeline})"
    if r.mean is None or r.std is None:
        return AFFINE_SCALING + where
    return (
        "latent = (z - latents_mean[c]) * scale_factor / latents_std[c] for each channel c; "
        "z = latent * latents_std[c] / scale_factor + latents_mean[c]; "
        f"latents_mean = {list(r.mean)}; latents_std = {list(r.std)}" + where
    )


def model_folder(path: str | os.PathLike[str]) -> Path:
    """The absolute folder of `path`, checked to hold a `config.json`."""
    folder = Path(os.path.abspath(os.path.expanduser(path)))
    if (folder / CONFIG_FILE).is_file():
        return folder
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers model folder not found: {folder}")
    hint = f"; is the VAE in {folder / 'vae'}?" if (folder / "vae" / CONFIG_FILE).is_file() else ""
    raise FileNotFoundError(f"no {CONFIG_FILE} in {folder} (not a diffusers model folder){hint}")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files `from_pretrained` loads from `folder` (one, or the shards of the index).

    Raises:
        CheckpointError: There are none (pickle `.bin` weights are never loaded).
    """
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    if (folder / WEIGHTS_INDEX).is_file():
        index = json.loads((folder / WEIGHTS_INDEX).read_text())
        shards = sorted({folder / name for name in index["weight_map"].values()})
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards named in {WEIGHTS_INDEX} are missing: {', '.join(missing)}")
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); safetensors only are loaded (pickle files "
            "can run code): re-save the model once with save_pretrained(folder, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX})")


def folder_sha256(folder: str | os.PathLike[str]) -> str:
    """Identity of a model folder: SHA-256 over its config and safetensors weights.

    The digest of the `sha256sum` listing of `config.json` and the weight files, names relative
    to the folder, sorted: `cd FOLDER && sha256sum config.json diffusion_pytorch_model.safetensors
    | sha256sum` gives the same value. It does not depend on where the folder is.
    """
    folder = Path(folder)
    files = sorted([folder / CONFIG_FILE, *weight_files(folder)], key=lambda p: p.name)
    listing = "".join(f"{file_sha256(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _read_tensors(weights: list[Path], names: tuple[str, ...]) -> list[list[float] | None]:
    """Small tensors read from the weights, as float32 values in their shortest decimal form."""
    found: dict[str, list[float]] = {}
    for path in weights:
        for name, tensor in read_tensors(path, names).items():
            found[name] = [float(str(v)) for v in tensor.to(torch.float32).numpy()]  # shortest round trip
    return [found.get(name) for name in names]


def _refuse_checkpoint(preset: VAEPreset, checkpoint: str | os.PathLike[str] | None) -> None:
    if checkpoint is not None:
        raise CheckpointError(
            f"--checkpoint {checkpoint} cannot be used with '{preset.name}': its folder {preset.weights} "
            "is the checkpoint (weights and config); drop --checkpoint"
        )


def check_diffusers_folder(preset: VAEPreset, checkpoint: str | os.PathLike[str] | None = None) -> None:
    """Checks the folder's weights against the model its config builds, reading only file headers.

    Raises:
        CheckpointError: A `checkpoint` was given, or keys or shapes do not match.
    """
    _refuse_checkpoint(preset, checkpoint)
    folder = Path(preset.weights)
    shapes: dict[str, tuple[int, ...]] = {}
    files = weight_files(folder)
    for path in files:
        shapes.update(read_shapes(path))
    with torch.device("meta"):
        model = build_diffusers_vae(preset.params).model
    if len(files) == 1 and hasattr(model, "_fix_state_dict_keys_on_load"):
        model._fix_state_dict_keys_on_load(shapes)  # renames old attention keys, as from_pretrained does
    check_keys(model, shapes, preset.name, folder)


def load_diffusers_vae(
    preset: VAEPreset,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> DiffusersVAE:
    """Loads the folder with `from_pretrained`: local files only, safetensors only, every key matched.

    `seed` is unused (a folder always has its weights); it is part of every family's `load`.

    Raises:
        CheckpointError: A `checkpoint` was given, or the weights do not fit the model.
    """
    _refuse_checkpoint(preset, checkpoint)
    from diffusers.utils import is_accelerate_available

    cls = model_class(preset.params.class_name)
    # Without accelerate, from_pretrained initialises the weights randomly before loading them.
    try:
        with torch.random.fork_rng(devices=[]):
            model, info = cls.from_pretrained(
                preset.weights,
                local_files_only=True,
                use_safetensors=True,
                torch_dtype=dtype,
                output_loading_info=True,
                low_cpu_mem_usage=is_accelerate_available(),
            )
    except (OSError, RuntimeError, ValueError) as e:  # e.g. shapes that do not fit: diffusers raises
        raise CheckpointError(f"{preset.weights}: cannot load {preset.params.class_name}: {describe_error(e)}") from e
    problems = [(label, info.get(key) or []) for label, key in _LOADING_PROBLEMS]
    if any(keys for _, keys in problems):
        found = "; ".join(f"{len(keys)} {label}: {', '.join(map(str, keys[:6]))}" for label, keys in problems if keys)
        raise CheckpointError(f"{preset.weights} does not fit {preset.params.class_name}: {found}")
    return DiffusersVAE(model, preset.params).to(device).eval().requires_grad_(False)


_LOADING_PROBLEMS = (
    ("missing keys", "missing_keys"),
    ("unexpected keys", "unexpected_keys"),
    ("shapes", "mismatched_keys"),
    ("errors", "error_msgs"),
)


DIFFUSERS = VAEFamily(
    name="diffusers",
    build=build_diffusers_vae,
    load=load_diffusers_vae,
    check=check_diffusers_folder,
    weights_sha256=folder_sha256,
    variational=True,
    opensora=None,  # never split here: diffusers' own memory modes are off, the model runs whole
)
