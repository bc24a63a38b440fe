"""The FLUX AE: checkpoint layout, video folding, scaling, and equality with diffusers' AutoencoderKL."""

from __future__ import annotations

import re

import pytest
import torch

from vae import get_preset, load_vae
from vae.autoencoder_2d import AutoEncoder2D, AutoEncoder2DParams

# Shapes of the public ae.safetensors (REFERENCE.md 1a).
FLUX_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (32, 512, 3, 3),
    "decoder.conv_in.weight": (512, 16, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


def test_full_config_matches_the_public_checkpoint_layout():
    with torch.device("meta"):
        model = AutoEncoder2D(AutoEncoder2DParams())
    state = model.state_dict()
    assert len(state) == 244
    assert sum(p.numel() for p in model.parameters()) == 83_819_683
    assert sum(p.numel() for p in model.encoder.parameters()) == 34_274_208
    for key, shape in FLUX_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("quant_conv" in k for k in state)


@pytest.fixture(scope="module")
def tiny() -> AutoEncoder2D:
    return load_vae("flux-ae-tiny")


def test_frames_are_encoded_independently(tiny):
    x = torch.rand(2, 3, 3, 32, 48) * 2 - 1
    z, posterior = tiny.encode(x, sample=False)
    assert z.shape == (2, 16, 3, 4, 6) and posterior.mean.shape == (2, 16, 3, 4, 6)
    one = tiny.encode(x[1:, :, 2:3], sample=False)[0]
    torch.testing.assert_close(z[1:, :, 2:3], one, atol=1e-5, rtol=1e-5)


def test_encode_scales_and_decode_inverts(tiny):
    p = tiny.params
    x = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    z, posterior = tiny.encode(x, sample=False)
    torch.testing.assert_close(z, p.scale_factor * (posterior.mean - p.shift_factor))
    raw = posterior.mean[:, :, 0]
    torch.testing.assert_close(tiny.decode(z)[:, :, 0], tiny.decoder(raw), atol=1e-5, rtol=1e-5)
    assert tiny.decode(z).shape == x.shape


def test_sampling_uses_the_given_generators(tiny):
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    z, posterior = tiny.encode(x, generator=gens)
    eps = torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(2))
    expected = tiny.params.scale_factor * (posterior.mean[1] + posterior.std[1] * eps - tiny.params.shift_factor)
    torch.testing.assert_close(z[1], expected)


def test_preset_rules():
    preset = get_preset("flux-ae")
    assert preset.latent_shape(17, 256, 320) == (16, 17, 32, 40)
    assert preset.frame_rule == "any"
    with pytest.raises(ValueError, match="height 100 .must be a positive multiple of 8"):
        preset.check_input(4, 100, 64)
    with pytest.raises(KeyError, match="unknown VAE 'nope'; known: "):
        get_preset("nope")


# -- equality with diffusers' AutoencoderKL (LDM key names -> diffusers key names) -------


def _to_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", k)
        k = re.sub(
            r"\.mid\.attn_1\.(q|k|v|proj_out|norm)\.",
            lambda m: (
                ".mid_block.attentions.0."
                + {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "norm": "group_norm"}[m[1]]
                + "."
            ),
            k,
        )
        k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", k)
        k = re.sub(
            r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", k
        )
        k = k.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")
        if ".attentions.0.to_" in k and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> Linear
        out[k] = value
    return out


def test_matches_diffusers_autoencoder_kl():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    params = AutoEncoder2DParams(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1)
    ours = AutoEncoder2D(params).eval()
    for p in ours.parameters():  # non-trivial norms and biases too
        p.data.add_(torch.randn_like(p) * 0.05)
    ref = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    ref.load_state_dict(_to_diffusers(ours.state_dict(), 4), strict=True)
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        moments = ours.encoder(x)
        ref_moments = ref.encoder(x)
        z = torch.randn(2, 16, 5, 7)
        decoded, ref_decoded = ours.decoder(z), ref.decoder(z)
    assert (moments - ref_moments).abs().max() <= 1e-4
    assert (decoded - ref_decoded).abs().max() <= 1e-4
