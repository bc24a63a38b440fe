"""Full-size checkpoints in each public file's layout load strictly through `load_vae`.

The files are synthesised from the architectures' shapes (no weights are downloaded): what is
checked is that a file with exactly the public key layout loads with strict key checking,
with the prefixes the original distributions carry, and that the loaded model runs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vae import get_preset, load_vae

pytestmark = pytest.mark.slow


def _public_file(tmp_path, name: str, dtype: torch.dtype, prefix: str = ""):
    preset = get_preset(name)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in preset.build().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {f"{prefix}{k}": (torch.rand(s, generator=gen) * 0.02 - 0.01).to(dtype) for k, s in shapes.items()}
    path = tmp_path / preset.checkpoint
    save_file(state, path)
    return path, len(state), sum(t.numel() for t in state.values())


@pytest.mark.parametrize(
    ("name", "dtype", "prefix", "keys", "params", "frames", "size"),
    [
        ("flux-ae", torch.float32, "", 244, 83_819_683, 2, 16),  # ae.safetensors is fp32, flat
        ("hunyuan-vae", torch.bfloat16, "vae.", 248, 246_478_803, 5, 16),  # HunyuanVideo's own prefix
        ("dc-ae-f32t4c128", torch.bfloat16, "", 339, 459_462_147, 4, 32),
    ],
)
def test_full_size_checkpoint_loads_strictly(tmp_path, name, dtype, prefix, keys, params, frames, size):
    path, n_keys, n_params = _public_file(tmp_path, name, dtype, prefix)
    assert (n_keys, n_params) == (keys, params)
    model = load_vae(name, path, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(not t.is_meta for t in model.state_dict().values())
    preset = get_preset(name)
    x = torch.rand(1, 3, frames, size, size) * 2 - 1
    with torch.inference_mode():
        latent, _ = model.encode(x, sample=False)
    assert tuple(latent.shape[1:]) == preset.latent_shape(frames, size, size)
    assert torch.isfinite(latent).all()
