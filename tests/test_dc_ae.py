"""The video DC-AE: checkpoint layout, equality with Open-Sora's implementation, shape rules, scaling.

The golden fixture holds a narrow DC-AE's weights, inputs, latents and decodes computed by
Open-Sora's own code (tests/fixtures/dc_ae/make_golden.py says how it was made).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vae import check_checkpoint, get_preset, load_vae
from vae.dc_ae import DCAE, DCAEParams

GOLDEN = Path(__file__).parent / "fixtures" / "dc_ae" / "golden.safetensors"
TOLERANCE = 1e-4  # fp32, max abs difference

# Shapes of the public F32T4C128_AE.safetensors (REFERENCE.md 1c).
DC_AE_KEYS = {
    "encoder.project_in.conv.weight": (128, 3, 3, 3, 3),
    "encoder.stages.0.op_list.0.main.conv1.conv.weight": (128, 128, 3, 3, 3),
    "encoder.stages.0.op_list.0.main.conv2.norm.bias": (128,),
    "encoder.stages.0.op_list.2.main.conv.weight": (256, 128, 3, 3, 3),
    "encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight": (1536, 512, 1, 1, 1),
    "encoder.stages.3.op_list.0.context_module.main.aggreg.0.0.weight": (1536, 1, 5, 5, 5),
    "encoder.stages.3.op_list.0.context_module.main.aggreg.0.1.weight": (1536, 32, 1, 1, 1),
    "encoder.stages.3.op_list.0.context_module.main.proj.conv.weight": (512, 1024, 1, 1, 1),
    "encoder.stages.3.op_list.0.local_module.main.inverted_conv.conv.weight": (4096, 512, 1, 1, 1),
    "encoder.stages.3.op_list.0.local_module.main.depth_conv.conv.weight": (4096, 1, 3, 3, 3),
    "encoder.stages.3.op_list.0.local_module.main.point_conv.conv.weight": (512, 2048, 1, 1, 1),
    "encoder.stages.3.op_list.3.main.conv.weight": (1024, 512, 3, 3, 3),
    "encoder.project_out.main.op_list.0.conv.weight": (128, 1024, 3, 3, 3),
    "decoder.project_in.main.conv.weight": (1024, 128, 3, 3, 3),
    "decoder.stages.3.op_list.0.main.conv.conv.weight": (512, 1024, 3, 3, 3),
    "decoder.stages.0.op_list.3.main.conv2.conv.weight": (128, 128, 3, 3, 3),
    "decoder.project_out.op_list.0.weight": (128,),
    "decoder.project_out.op_list.2.conv.weight": (3, 128, 3, 3, 3),
}


def test_full_config_matches_the_public_checkpoint_layout():
    with torch.device("meta"):
        model = DCAE(DCAEParams())
    state = model.state_dict()
    assert len(state) == 339
    assert sum(p.numel() for p in model.parameters()) == 459_462_147
    assert sum(p.numel() for p in model.encoder.parameters()) == 220_439_936
    for key, shape in DC_AE_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # Only the norm, the activation and the conv: no encoder out-norm, no quant convs.
    assert not any("quant" in k for k in state)


def test_full_preset():
    preset = get_preset("dc-ae-f32t4c128")
    assert (preset.family.name, preset.checkpoint) == ("dc_ae", "F32T4C128_AE.safetensors")
    assert (preset.spatial_compression, preset.temporal_compression, preset.size_multiple) == (32, 4, 32)
    assert (preset.causal, preset.variational, preset.latent_channels) == (False, False, 128)
    assert preset.params == dataclasses.replace(DCAEParams(), scaling_factor=0.493)
    assert preset.latent_shape(32, 256, 256) == (128, 8, 8, 8)
    assert preset.latent_shape(1, 256, 256) == (128, 1, 8, 8)
    # Open-Sora divides by its scaling_factor: in preset terms a multiplier of 1/0.493, no shift.
    assert preset.scale_factor == pytest.approx(1 / 0.493) and preset.shift_factor == 0.0
    assert "latent = z / scaling_factor" in preset.scaling and "0.493" in preset.scaling
    json.dumps(preset.describe())


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def golden_state(golden) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def reference_tiny(golden_state) -> DCAE:
    """dc-ae-tiny with the fixture's reference weights, loaded with strict key checking."""
    model = DCAE(get_preset("dc-ae-tiny").params).eval().requires_grad_(False)
    model.load_state_dict({k: v.float() for k, v in golden_state.items()}, strict=True)
    return model


def test_fixture_was_made_at_the_tiny_presets_sizes():
    with safe_open(str(GOLDEN), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    params = get_preset("dc-ae-tiny").params
    assert config == {
        "latent_channels": params.latent_channels,
        "widths": list(params.widths),
        "encoder_depths": list(params.encoder_depths),
        "decoder_depths": list(params.decoder_depths),
    }
    assert float(meta["scaling_factor"]) == params.scaling_factor
    assert GOLDEN.stat().st_size < 2_000_000


@pytest.mark.parametrize("label", ["t8", "t1"])
def test_matches_open_soras_implementation(reference_tiny, golden, label):
    x = golden[f"golden.x_{label}"].float()
    with torch.no_grad():
        latent, posterior = reference_tiny.encode(x)
        decoded = reference_tiny.decode(golden[f"golden.latent_{label}"])
    assert posterior is None
    torch.testing.assert_close(latent, golden[f"golden.latent_{label}"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(decoded, golden[f"golden.decoded_{label}"], atol=TOLERANCE, rtol=0)


def test_load_vae_reproduces_the_reference(golden, golden_state, tmp_path):
    path = tmp_path / "dc_ae_tiny.safetensors"
    save_file(golden_state, str(path))
    check_checkpoint("dc-ae-tiny", path)
    model = load_vae("dc-ae-tiny", path)
    with torch.no_grad():
        latent, _ = model.encode(golden["golden.x_t8"].float(), sample=True, generator=torch.Generator())
        decoded = model.decode(latent)
    torch.testing.assert_close(latent, golden["golden.latent_t8"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(decoded, golden["golden.decoded_t8"], atol=TOLERANCE, rtol=0)


def test_bf16_stays_close_to_the_reference(golden, golden_state, tmp_path):
    path = tmp_path / "dc_ae_tiny.safetensors"
    save_file(golden_state, str(path))
    model = load_vae("dc-ae-tiny", path, dtype=torch.bfloat16)
    with torch.no_grad():
        latent, _ = model.encode(golden["golden.x_t8"])
    assert latent.dtype == torch.bfloat16
    error = (latent.float() - golden["golden.latent_t8"]).norm() / golden["golden.latent_t8"].norm()
    assert error < 0.03  # ~0.007 measured: bf16 rounding only


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 5, 32, 32), "5 frames (T must be 1 or a multiple of 4)"),
        ((1, 3, 2, 32, 32), "2 frames"),
        ((1, 3, 4, 48, 32), "height 48 (must be a positive multiple of 32)"),
        ((1, 3, 1, 32, 16), "width 16"),
        ((1, 4, 1, 32, 32), "expects B 3 T H W video"),
    ],
)
def test_shape_rules(reference_tiny, shape, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        reference_tiny.encode(torch.zeros(shape))
    if shape[1] == 3:  # the preset states the same rules
        with pytest.raises(ValueError):
            get_preset("dc-ae-tiny").check_input(*shape[2:])


def test_frame_counts(reference_tiny):
    preset = get_preset("dc-ae-tiny")
    with torch.no_grad():
        for t, latent_t, decoded_t in ((1, 1, 1), (4, 1, 1), (12, 3, 12)):
            latent, _ = reference_tiny.encode(torch.zeros(1, 3, t, 32, 32))
            assert latent.shape == (1, *preset.latent_shape(t, 32, 32)) == (1, 16, latent_t, 1, 1)
            # One latent frame is never upsampled in time (Open-Sora does the same).
            assert reference_tiny.decode(latent).shape == (1, 3, decoded_t, 32, 32)


def test_scaling_is_applied_the_open_sora_way(golden_state):
    scaled = load_vae("dc-ae-tiny")
    s = scaled.params.scaling_factor
    raw = DCAE(dataclasses.replace(scaled.params, scaling_factor=None)).eval()
    raw.load_state_dict(scaled.state_dict())
    x = torch.rand(1, 3, 4, 32, 64) * 2 - 1
    with torch.no_grad():
        z, _ = raw.encode(x)
        latent, _ = scaled.encode(x)
        torch.testing.assert_close(latent, z / s, atol=0, rtol=0)
        torch.testing.assert_close(scaled.decode(latent), raw.decode(z), atol=1e-5, rtol=1e-5)
    preset = get_preset("dc-ae-tiny")
    torch.testing.assert_close(latent, preset.scale_factor * (z - preset.shift_factor), atol=1e-6, rtol=1e-6)


def test_batch_items_are_independent(reference_tiny, golden):
    x = golden["golden.x_t1"].float()
    with torch.no_grad():
        both, _ = reference_tiny.encode(x)
        second, _ = reference_tiny.encode(x[1:])
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)


def test_params_are_validated():
    with pytest.raises(ValueError, match="temporal_resample"):
        DCAEParams(temporal_resample=(True,)).validate()
    with pytest.raises(ValueError, match="unknown block types"):
        DCAEParams(block_types=("ResBlock",) * 5 + ("Attn",)).validate()
    with pytest.raises(ValueError, match="head_dim"):
        with torch.device("meta"):
            DCAE(dataclasses.replace(get_preset("dc-ae-tiny").params, head_dim=24))
