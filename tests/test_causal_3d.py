"""Tests of `vae/causal_3d.py`: numerical equivalence with diffusers' `AutoencoderKLHunyuanVideo`
(shared random weights), the full config's parameter layout, loading, causality, frame rules.

Run: python -m pytest tests/test_causal_3d.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLHunyuanVideo
from safetensors.torch import save_file

from vae import CheckpointError, DiagonalGaussianDistribution, check_checkpoint, get_preset, load_vae
from vae.causal_3d import (
    AutoencoderKLCausal3D,
    Causal3DParams,
    CausalConv3d,
    DownsampleCausal3D,
    UpsampleCausal3D,
    diffusers_kwargs,
    frame_causal_attention,
    level_factors,
)
from vae.checkpoint import strip_prefixes

TINY = get_preset("hunyuan-vae-tiny").params
# The released depth (2 resnets per encoder level, 3 per decoder level) at small widths,
# with fewer norm groups than the default so that `norm_num_groups` is exercised.
DEEP = Causal3DParams(block_out_channels=(16, 16, 32, 32), layers_per_block=2, norm_num_groups=8)
TOLERANCE = 1e-4  # max abs difference allowed against diffusers in fp32


def _video(batch: int, frames: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


def _diffusers_model(p: Causal3DParams, seed: int = 0) -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(seed)
    ref = AutoencoderKLHunyuanVideo(**diffusers_kwargs(p))
    # diffusers encodes and decodes this model framewise (overlapping temporal tiles) by
    # default; compare against the full-clip computation that Open-Sora runs untiled.
    ref.use_framewise_encoding = ref.use_framewise_decoding = False
    ref.use_tiling = ref.use_slicing = False
    # Norm affines start at exactly 1 and 0, which would hide a mix-up between two norms.
    with torch.no_grad():
        for name, t in ref.named_parameters():
            if "norm" in name:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(t))
    return ref.eval()


@pytest.fixture(scope="module", params=[TINY, DEEP], ids=["tiny", "deep"])
def pair(request: pytest.FixtureRequest) -> tuple[AutoencoderKLCausal3D, AutoencoderKLHunyuanVideo]:
    ref = _diffusers_model(request.param)
    model = AutoencoderKLCausal3D(request.param).eval()
    model.load_state_dict(ref.state_dict(), strict=True)  # keys map 1:1, no renaming
    return model, ref


@pytest.mark.parametrize(("batch", "frames"), [(1, 1), (2, 5), (1, 17)])
@torch.no_grad()
def test_matches_diffusers(pair, batch, frames):
    model, ref = pair
    x = _video(batch, frames)
    posterior = model.posterior(x)
    expected = ref.encode(x).latent_dist
    latent_frames = (frames - 1) // 4 + 1
    assert posterior.mean.shape == (batch, 16, latent_frames, 4, 4)
    assert (posterior.mean - expected.mean).abs().max() <= TOLERANCE
    assert (posterior.logvar - expected.logvar).abs().max() <= TOLERANCE

    latent, _ = model.encode(x, sample=False)
    assert torch.allclose(latent, model.scale_factor * (posterior.mean - model.shift_factor))
    decoded = model.decode(latent)
    assert decoded.shape == x.shape  # T' latent frames -> 4(T'-1)+1 frames
    assert (decoded - ref.decode(posterior.mean).sample).abs().max() <= TOLERANCE


def test_full_config_layout_on_meta_device():
    preset = get_preset("hunyuan-vae")
    assert preset.params == Causal3DParams()
    with torch.device("meta"):
        model = preset.build()
        ref = AutoencoderKLHunyuanVideo()
    state = model.state_dict()
    assert sum(t.numel() for t in model.parameters()) == 246_478_803
    assert round(sum(t.numel() for t in model.encoder.parameters()) / 1e6, 2) == 100.34
    assert round(sum(t.numel() for t in model.decoder.parameters()) / 1e6, 2) == 146.14
    assert len(state) == 248
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert shapes["encoder.conv_in.conv.weight"] == (128, 3, 3, 3, 3)
    assert shapes["encoder.down_blocks.1.resnets.0.conv_shortcut.conv.weight"] == (256, 128, 1, 1, 1)
    assert shapes["encoder.down_blocks.0.downsamplers.0.conv.conv.weight"] == (128, 128, 3, 3, 3)
    assert shapes["encoder.mid_block.attentions.0.to_q.weight"] == (512, 512)
    assert shapes["encoder.mid_block.attentions.0.to_out.0.weight"] == (512, 512)
    assert shapes["encoder.conv_out.conv.weight"] == (32, 512, 3, 3, 3)
    assert shapes["quant_conv.weight"] == (32, 32, 1, 1, 1)
    assert shapes["post_quant_conv.weight"] == (16, 16, 1, 1, 1)
    assert shapes["decoder.up_blocks.0.upsamplers.0.conv.conv.weight"] == (512, 512, 3, 3, 3)
    assert shapes["decoder.up_blocks.0.resnets.2.conv2.conv.weight"] == (512, 512, 3, 3, 3)
    assert shapes["decoder.conv_out.conv.weight"] == (3, 128, 3, 3, 3)
    assert "encoder.down_blocks.3.downsamplers.0.conv.conv.weight" not in shapes
    assert "decoder.up_blocks.3.upsamplers.0.conv.conv.weight" not in shapes
    assert level_factors(preset.params) == [(1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1)]


def _save(state: dict[str, torch.Tensor], path, prefix: str = "") -> None:
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))


@torch.no_grad()
def test_loads_prefixed_checkpoint_strictly(tmp_path):
    torch.manual_seed(3)
    model = AutoencoderKLCausal3D(TINY).eval()
    path = tmp_path / "hunyuan_vae.safetensors"
    _save(model.state_dict(), path, prefix="vae.")  # as in the original HunyuanVideo files
    check_checkpoint("hunyuan-vae-tiny", path)
    loaded = load_vae("hunyuan-vae-tiny", path)
    x = _video(1, 5)
    latent, _ = loaded.encode(x, sample=False)
    assert torch.equal(latent, model.encode(x, sample=False)[0])
    assert torch.equal(loaded.decode(latent), model.decode(latent))


def test_missing_key_is_named(tmp_path):
    state = AutoencoderKLCausal3D(TINY).state_dict()
    del state["encoder.mid_block.attentions.0.to_q.weight"]
    path = tmp_path / "broken.safetensors"
    _save(state, path, prefix="module.vae.")
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.mid_block\.attentions\.0\.to_q\.weight"):
        load_vae("hunyuan-vae-tiny", path)


def test_prefixes_are_stripped_repeatedly_and_collisions_rejected(tmp_path):
    prefixes = get_preset("hunyuan-vae").key_prefixes
    for key in ("vae.quant_conv.weight", "module.vae.quant_conv.weight", "state_dict.vae.quant_conv.weight"):
        assert strip_prefixes(key, prefixes) == "quant_conv.weight"
    path = tmp_path / "twice.safetensors"
    save_file({"vae.quant_conv.bias": torch.zeros(32), "quant_conv.bias": torch.zeros(32)}, str(path))
    with pytest.raises(CheckpointError, match="both map to 'quant_conv.bias'"):
        check_checkpoint("hunyuan-vae-tiny", path)


def _prefix_check(layer: torch.nn.Module, x: torch.Tensor, cuts: dict[int, int]) -> None:
    """Output frames [:out] from the whole clip equal those from its first `in` frames alone."""
    with torch.no_grad():
        full = layer(x)
        for frames_in, frames_out in cuts.items():
            torch.testing.assert_close(layer(x[:, :, :frames_in])[:, :, :frames_out], full[:, :, :frames_out])


def test_convolutions_and_resamplers_are_causal():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 9, 8, 8)
    _prefix_check(CausalConv3d(8, 8), x, {n: n for n in range(1, 10)})
    # 1+2m frames -> 1+m: the first output frame comes from the first input frame alone.
    _prefix_check(DownsampleCausal3D(8, (2, 2, 2)), x, {1: 1, 3: 2, 5: 3, 7: 4})
    # 1+m frames -> 1+2m: the first frame is upsampled in H and W only.
    up = UpsampleCausal3D(8, (2, 2, 2))
    assert up(x[:, :, :5]).shape == (1, 8, 9, 16, 16)
    _prefix_check(up, x[:, :, :5], {1: 1, 2: 3, 3: 5, 4: 7})


def test_attention_sees_own_and_earlier_frames_only():
    torch.manual_seed(0)
    frames, hw, channels = 4, 6, 16
    q, k, v = torch.randn(3, 2, frames * hw, channels).unbind(0)
    frame = torch.arange(frames * hw) // hw
    mask = torch.where(frame[None, :] <= frame[:, None], 0.0, float("-inf"))  # query rows, key columns
    weights = torch.softmax(q @ k.transpose(1, 2) / channels**0.5 + mask, dim=-1)
    torch.testing.assert_close(frame_causal_attention(q, k, v, hw), weights @ v)


@torch.no_grad()
def test_group_norm_statistics_span_the_clip():
    # Documents a property of the reference, kept here: convolutions and attention are causal,
    # but GroupNorm normalises over all frames, so changing frames 5-8 of a 9-frame clip moves
    # the latents of frames 0-4 too (latent frames 0-1). Exact chunked encoding must account
    # for it; encoding the first 5 frames alone is not a prefix of the full-clip latents.
    torch.manual_seed(0)
    model = AutoencoderKLCausal3D(TINY).eval()
    x = _video(1, 9)
    changed = torch.cat([x[:, :, :5], _video(1, 4, seed=1)], dim=2)
    early, early_changed = model.posterior(x).mean[:, :, :2], model.posterior(changed).mean[:, :, :2]
    assert (early - early_changed).abs().max() > 1e-4


def test_frame_rule():
    model = AutoencoderKLCausal3D(TINY)
    for frames in (2, 4, 6, 8, 16):
        with pytest.raises(ValueError, match=r"1\+4k frames"):
            model.posterior(_video(1, frames))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.posterior(_video(1, 5, height=36))
    preset = get_preset("hunyuan-vae")
    assert preset.latent_shape(17, 256, 256) == (16, 5, 32, 32)
    assert preset.latent_shape(129, 720, 1280) == (16, 33, 90, 160)
    with pytest.raises(ValueError, match="1\\+4k"):
        preset.latent_shape(16, 256, 256)
    assert preset.describe()["scaling"].startswith("latent = scale_factor * (z - shift_factor)")
    assert (preset.scale_factor, preset.shift_factor, preset.family.name) == (0.476986, 0.0, "causal_3d")


def test_per_item_generators_make_samples_independent_of_the_batch():
    moments = torch.randn(3, 32, 2, 4, 4)

    def draw(rows: list[int], seeds: list[int]) -> torch.Tensor:
        posterior = DiagonalGaussianDistribution(moments[rows])
        return posterior.sample([torch.Generator().manual_seed(s) for s in seeds])

    alone = draw([0], [7])[0]
    assert torch.equal(draw([0, 1], [7, 8])[0], alone)
    assert torch.equal(draw([2, 0], [9, 7])[1], alone)
    assert not torch.equal(draw([0], [8])[0], alone)


@torch.no_grad()
def test_encode_with_generators_is_batch_independent():
    torch.manual_seed(0)
    model = AutoencoderKLCausal3D(TINY).eval()
    x = _video(2, 5)
    both, _ = model.encode(x, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    second, _ = model.encode(x[1:], generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-5)


def test_upsample_matches_first_frame_spatial_only():
    # The clip's first frame is upsampled in H and W only; the rest also in T.
    x = torch.randn(1, 2, 3, 2, 2)
    up = UpsampleCausal3D(2, (2, 2, 2))
    first = F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2), mode="nearest")
    rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 2, 2), mode="nearest")
    with torch.no_grad():
        torch.testing.assert_close(up(x), up.conv(torch.cat([first, rest], dim=2)), rtol=0, atol=0)


@pytest.mark.slow
@torch.no_grad()
def test_full_config_matches_diffusers():
    # The released architecture at full width (random weights, ~2 GB of RAM for both models).
    params = Causal3DParams()
    ref = _diffusers_model(params)
    model = AutoencoderKLCausal3D(params).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = _video(1, 9)
    posterior = model.posterior(x)
    expected = ref.encode(x).latent_dist
    assert (posterior.mean - expected.mean).abs().max() <= TOLERANCE
    assert (posterior.logvar - expected.logvar).abs().max() <= TOLERANCE
    latent, _ = model.encode(x, sample=False)
    assert (model.decode(latent) - ref.decode(posterior.mean).sample).abs().max() <= TOLERANCE
