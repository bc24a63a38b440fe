"""Build a model of this package from its preset and load its weights from one safetensors file.

The model is built on the meta device and the checkpoint tensors are assigned in place, so
loading costs one read of the file and no throwaway random initialisation. These are the
`load` and `check` of the native families (`vae/families.py`); `vae.registry.load_vae` is the
entry point for every family.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from vae.checkpoint import check_keys, checked_path, read_shapes, read_state_dict
from vae.spec import VAEPreset


def load_native(
    preset: VAEPreset,
    checkpoint: str | os.PathLike[str] | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """Builds the preset's model, in eval mode with gradients off (see `vae.registry.load_vae`)."""
    device = torch.device(device)
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = preset.build()
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    state = read_state_dict(checkpoint, device=device, prefixes=preset.key_prefixes, dtype=dtype)
    return build_with(preset, state, checkpoint)


def build_with(preset: VAEPreset, state: dict[str, torch.Tensor], source: str | os.PathLike[str]) -> nn.Module:
    """The preset's model built on the meta device and given `state`'s tensors as they are (their
    device and dtype), in eval mode with gradients off; `source` names the weights in errors."""
    with torch.device("meta"):
        model = preset.build()
    check_keys(model, {k: tuple(v.shape) for k, v in state.items()}, preset.name, source)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a non-persistent buffer the model forgot to create on the real device
        raise RuntimeError(f"{preset.name}: tensors left on the meta device after loading: {leftover}")
    return model.eval().requires_grad_(False)


def check_native(preset: VAEPreset, checkpoint: str | os.PathLike[str] | None) -> None:
    """Checks a checkpoint's keys and shapes against the preset, reading only the file header."""
    if checkpoint is None:
        return
    path = checked_path(checkpoint)
    shapes = read_shapes(path, preset.key_prefixes)
    with torch.device("meta"):
        model = preset.build()
    check_keys(model, shapes, preset.name, path)
