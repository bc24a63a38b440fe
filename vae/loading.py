"""Build a VAE from a preset and load its weights from a safetensors file.

Weights are only ever read from safetensors (no pickle). The model is built on the meta
device and the checkpoint tensors are assigned in place, so loading costs one read of the
file and no throwaway random initialisation.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from vae.presets import DIFFUSERS_FAMILY, VAEPreset, get_preset

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl"}


class CheckpointError(ValueError):
    """The checkpoint cannot be used with the requested preset."""


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
    preset = get_preset(name) if isinstance(name, str) else name
    if preset.family == DIFFUSERS_FAMILY:
        from vae.diffusers_vae import load_diffusers_vae  # imports diffusers

        return load_diffusers_vae(preset, checkpoint, device, dtype)
    device = torch.device(device)
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = preset.build(preset.params)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    state = read_state_dict(checkpoint, device=device, prefixes=preset.key_prefixes)
    with torch.device("meta"):
        model = preset.build(preset.params)
    check_keys(model, {k: tuple(v.shape) for k, v in state.items()}, preset.name, checkpoint)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a non-persistent buffer the model forgot to create on the real device
        raise RuntimeError(f"{preset.name}: tensors left on the meta device after loading: {leftover}")
    return model.eval().requires_grad_(False)


def check_checkpoint(name: str | VAEPreset, checkpoint: str | os.PathLike[str] | None = None) -> None:
    """Checks a checkpoint's keys and shapes against a preset, reading only the file header.

    Without a checkpoint there is nothing to check (random weights), except for a diffusers
    preset, whose folder is checked instead.

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: As `load_vae` would.
    """
    preset = get_preset(name) if isinstance(name, str) else name
    if preset.family == DIFFUSERS_FAMILY:
        from vae.diffusers_vae import check_diffusers_folder  # imports diffusers

        check_diffusers_folder(preset, checkpoint)
        return
    if checkpoint is None:
        return
    path = _checked_path(checkpoint)
    shapes = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = _unique(_strip(key, preset.key_prefixes), key, shapes, path)
                shapes[name] = tuple(f.get_slice(key).get_shape())
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    with torch.device("meta"):
        model = preset.build(preset.params)
    check_keys(model, shapes, preset.name, path)


def _checked_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: only safetensors checkpoints are loaded (pickle files can run code); "
            "convert it once with safetensors.torch.save_file"
        )
    return path


def read_state_dict(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    prefixes: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Reads a safetensors file, stripping the given prefixes from every key (see `_strip`)."""
    path = _checked_path(path)
    state = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[_unique(_strip(key, prefixes), key, state, path)] = f.get_tensor(key)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return state


def _strip(key: str, prefixes: Iterable[str]) -> str:
    """Strips known prefixes from the front of `key` for as long as one matches.

    Nested wrappers stack up (`module.vae.encoder...`, `state_dict.vae.encoder...`), so one
    pass is not enough.
    """
    prefixes = tuple(p for p in prefixes if p)
    while prefix := next((p for p in prefixes if key.startswith(p)), None):
        key = key[len(prefix) :]
    return key


def _unique(name: str, key: str, seen: dict[str, object], path: str | os.PathLike[str]) -> str:
    # Two file keys that strip to one name (`vae.x` and `x`) would silently overwrite each other.
    if name in seen:
        raise CheckpointError(f"{path}: key '{key}' and another key both map to '{name}' after stripping prefixes")
    return name


def check_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]], name: str, path: str | os.PathLike[str]) -> None:
    """Raises CheckpointError naming missing, unexpected and wrongly shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(f"{k} {shapes[k]} != {expected[k]}" for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    if missing or unexpected or wrong:
        found = [("missing keys", missing), ("unexpected keys", unexpected), ("shapes (file != model)", wrong)]
        parts = [f"{len(x)} {label}: {_some(x)}" for label, x in found if x]
        raise CheckpointError(f"{path} does not fit VAE '{name}': " + "; ".join(parts))


def _some(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """The checkpoint identity recorded with every latent: of a file, or of a diffusers model folder."""
    if os.path.isdir(path):
        from vae.diffusers_vae import folder_sha256

        return folder_sha256(path)
    return file_sha256(path)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (the checkpoint identity recorded with every latent)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
