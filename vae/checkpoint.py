"""Reading safetensors checkpoints: tensors, shapes from headers, strict key checks, file identity.

Weights are only ever read from safetensors (no pickle): a file with a pickle suffix is refused
unread. Keys can be stripped of wrapping prefixes (`module.`, `vae.`) before they are matched.
This is the only module of the package that opens weight files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from vae.errors import CheckpointError

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl"}


def checked_path(path: str | os.PathLike[str]) -> Path:
    """`path`, if it is a file that may be read (not a pickle).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: A pickle file.
    """
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
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Reads a safetensors file, stripping the given prefixes from every key (see `strip_prefixes`).

    With `dtype`, each floating-point tensor is converted as it is read, so that the device never
    holds the whole file in its own dtype beside the converted copy (a float32 checkpoint loaded in
    bfloat16 peaks at the bfloat16 model plus one float32 tensor)."""
    path = checked_path(path)
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[_unique(strip_prefixes(key, prefixes), key, state, path)] = tensor
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return state


def read_shapes(path: str | os.PathLike[str], prefixes: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a safetensors file, read from its header only (keys stripped)."""
    path = checked_path(path)
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[_unique(strip_prefixes(key, prefixes), key, shapes, path)] = tuple(f.get_slice(key).get_shape())
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return shapes


def read_tensors(path: str | os.PathLike[str], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors of `names` that the file holds (others are not read)."""
    path = checked_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in set(names) & set(f.keys())}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def strip_prefixes(key: str, prefixes: Iterable[str]) -> str:
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


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (a checkpoint's identity, a data file's checksum)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
