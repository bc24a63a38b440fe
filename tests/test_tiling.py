"""Tests of `vae/tiling.py` and `vae/causal_3d_stream.py` with the tiny presets (real models, fixed seeds).

- "opensora" mode equals tiles built and blended by hand from Open-Sora's documented rule, for
  every family, encode and decode (and, for the causal VAE, diffusers' independent
  implementation of the same rule);
- exact splits are exact: FLUX frame chunks; causal streaming once the GroupNorm statistics are
  the full clip's (norm "clip" with enough passes); "causal" statistics do not depend on the
  chunk size and make the encoder strictly causal;
- sampling happens once on the assembled posterior, per item;
- "auto" picks untiled, chunks, tiles in that order, and its measured peak memory stays bounded
  when the clip gets longer.

Run: python -m pytest tests/test_tiling.py -q
"""

from __future__ import annotations

import pytest
import torch

from vae import get_preset, load_vae
from vae.causal_3d_stream import chunk_bounds, group_norm_count, stream_encode
from vae.codec import decode_video, encode_video, estimate_bytes, plan_decode, plan_encode
from vae.memory import calibrated, measure_peak_bytes, traced_peak_bytes
from vae.spec import TilePlan, TilingConfig
from vae.tiling import opensora_plan

FAMILIES = {"autoencoder_2d": "flux-ae-tiny", "causal_3d": "hunyuan-vae-tiny", "dc_ae": "dc-ae-tiny"}


def _video(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    models = {name: load_vae(name, seed=1) for name in FAMILIES.values()}
    # Norm affines start at exactly 1 and 0, which would make statistics mix-ups invisible.
    with torch.no_grad():
        for n, t in models["hunyuan-vae-tiny"].named_parameters():
            if "norm" in n:
                t.copy_((1.0 if n.endswith("weight") else 0.0) + 0.2 * torch.randn_like(t))
    return models


# -- Open-Sora's rule, by hand ------------------------------------------------------------------


def _fade(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """The documented cross-fade, in place on b: b[y] = a[y - extent] * (1 - y/extent) + b[y] * (y/extent)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        b.select(dim, y).copy_(a.select(dim, y - extent) * (1 - y / extent) + b.select(dim, y) * (y / extent))


def _by_hand_spatial(fn, x, tile: int, tile_out: int, overlap: float) -> torch.Tensor:
    """All tiles first, then blend each with the one above and the one to the left, crop, concatenate."""
    stride, blend = int(tile * (1 - overlap)), int(tile_out * overlap)
    keep = tile_out - blend
    h, w = x.shape[-2:]
    rows = [[fn(x[..., i : i + tile, j : j + tile]) for j in range(0, w, stride)] for i in range(0, h, stride)]
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if i > 0:
                _fade(rows[i - 1][j], t, blend, -2)
            if j > 0:
                _fade(row[j - 1], t, blend, -1)
    return torch.cat([torch.cat([t[..., :keep, :keep] for t in row], dim=-1) for row in rows], dim=-2)


def _by_hand_temporal(fn, x, tile: int, tile_out: int, overlap: float, causal: bool) -> torch.Tensor:
    """Causal: tiles of tile+1 frames, later tiles drop their first output, the first keeps one more."""
    stride, blend = int(tile * (1 - overlap)), int(tile_out * overlap)
    keep = tile_out - blend
    tiles = []
    for i in range(0, x.shape[2], stride):
        t = fn(x[:, :, i : i + tile + causal])
        tiles.append(t[:, :, 1:] if causal and i > 0 else t)
    for i in range(1, len(tiles)):
        _fade(tiles[i - 1], tiles[i], blend, 2)
    return torch.cat([t[:, :, : keep + (causal and i == 0)] for i, t in enumerate(tiles)], dim=2)


def _raw_encode(model, preset):
    """What Open-Sora blends: the posterior parameters (scaled latents for the DC-AE)."""
    if preset.family.name == "dc_ae":
        return lambda t: model.encode(t)[0]
    if preset.family.name == "causal_3d":
        return lambda t: model.quant_conv(model.encoder(t))
    return lambda t: model.posterior(t).parameters


def _posterior_parameters(preset, latent, posterior):
    return latent if posterior is None else posterior.parameters


# (family, input shape, spatial tile px, temporal tile frames or 0) - small shapes where the
# edge tiles are short, and for the causal VAE a 1-frame last temporal tile (dropped entirely).
OPENSORA_CASES = [
    ("causal_3d", (1, 3, 5, 56, 40), 32, 0),
    ("causal_3d", (2, 3, 37, 16, 16), 0, 16),
    ("causal_3d", (1, 3, 21, 40, 32), 32, 16),
    ("dc_ae", (1, 3, 1, 160, 224), 128, 0),
    ("dc_ae", (1, 3, 36, 32, 32), 0, 16),
    ("autoencoder_2d", (1, 3, 2, 72, 40), 32, 0),
]


@pytest.mark.parametrize(("family", "shape", "tile", "frames"), OPENSORA_CASES)
def test_opensora_mode_equals_the_rule_by_hand(models, family, shape, tile, frames):
    preset = get_preset(FAMILIES[family])
    model = models[preset.name]
    sc, tc = preset.spatial_compression, preset.temporal_compression
    config = TilingConfig(
        "opensora", spatial=bool(tile), temporal=bool(frames), spatial_tile=tile, temporal_tile=frames
    )
    x = _video(shape)
    latent, posterior = encode_video(model, preset, x, sample=False, tiling=config)

    encode = _raw_encode(model, preset)
    with torch.no_grad():
        if tile:
            spatial = encode

            def encode(t):
                return _by_hand_spatial(spatial, t, tile, tile // sc, 0.25)

        expected = _by_hand_temporal(encode, x, frames, frames // tc, 0.25, preset.causal) if frames else encode(x)
    assert torch.equal(_posterior_parameters(preset, latent, posterior), expected)
    assert latent.shape[1:] == preset.latent_shape(*shape[2:])

    # Decoding: latent tiles of tile/sc (frames/tc), blended in pixels over int(tile * 0.25).
    decoded = decode_video(model, preset, latent, tiling=config)
    decode = model.decode
    with torch.no_grad():
        if tile:
            spatial_decode = decode

            def decode(z):
                return _by_hand_spatial(spatial_decode, z, tile // sc, tile, 0.25)

        expected = (
            _by_hand_temporal(decode, latent, frames // tc, frames, 0.25, preset.causal) if frames else decode(latent)
        )
    assert torch.equal(decoded, expected)
    assert decoded.shape == x.shape


@torch.no_grad()
def test_opensora_mode_equals_diffusers_hunyuan_tiling(models):
    # diffusers' AutoencoderKLHunyuanVideo implements the same rule (spatial 256/192 and temporal
    # 64+1/48 in Open-Sora; set smaller here). Given our encoder, its tiling must agree exactly.
    diffusers = pytest.importorskip("diffusers")
    preset = get_preset("hunyuan-vae-tiny")
    model = models[preset.name]
    p = preset.params
    ref = diffusers.AutoencoderKLHunyuanVideo(
        latent_channels=p.latent_channels,
        block_out_channels=p.block_out_channels,
        layers_per_block=p.layers_per_block,
        norm_num_groups=p.norm_num_groups,
    ).eval()
    ref.encoder, ref.decoder, ref.quant_conv, ref.post_quant_conv = (
        model.encoder,
        model.decoder,
        model.quant_conv,
        model.post_quant_conv,
    )
    ref.enable_tiling(32, 32, 16, 24, 24, 12)
    x = _video((1, 3, 29, 40, 32))
    expected = ref.encode(x).latent_dist.parameters
    _, posterior = encode_video(
        model, preset, x, tiling=TilingConfig("opensora", temporal=True, spatial_tile=32, temporal_tile=16)
    )
    assert torch.equal(posterior.parameters, expected)


def test_opensora_training_defaults():
    # Open-Sora's training configs: hunyuan_vae spatial 256 only; dc_ae spatial 256 + temporal 32.
    assert opensora_plan(get_preset("hunyuan-vae")) == TilePlan(spatial_tile=256, temporal_size=64)
    assert opensora_plan(get_preset("dc-ae-f32t4c128")) == TilePlan("tiles", 32, 256)
    assert opensora_plan(get_preset("flux-ae")).untiled
    assert (
        get_preset("hunyuan-vae").family.opensora.overlap
        == get_preset("dc-ae-f32t4c128").family.opensora.overlap
        == 0.25
    )
    # Tiling applies only to frames larger than a tile (Open-Sora's `>` test).
    cfg = TilingConfig("opensora", spatial_tile=32)
    model, preset = load_vae("hunyuan-vae-tiny"), get_preset("hunyuan-vae-tiny")
    x = _video((1, 3, 5, 32, 32))
    assert torch.equal(encode_video(model, preset, x, sample=False, tiling=cfg)[0], model.encode(x, sample=False)[0])


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="does not tile evenly"):  # stride 24 px is 1.5 latent pixels at 16x
        encode_video(
            load_vae("flux-ae-tiny"),
            get_preset("flux-ae-tiny"),
            _video((1, 3, 1, 48, 48)),
            tiling=TilePlan(spatial_tile=20),
        )
    with pytest.raises(ValueError, match="mode must be one of"):
        TilingConfig("tiled")
    # Open-Sora's DC-AE decode would turn a trailing 1-latent-frame tile into one frame, not four.
    dc, preset = load_vae("dc-ae-tiny"), get_preset("dc-ae-tiny")
    with pytest.raises(ValueError, match="decodes to one frame instead of four"):
        decode_video(dc, preset, torch.zeros(1, 16, 10, 1, 1), tiling=TilePlan("tiles", 16))


# -- exact splits ------------------------------------------------------------------------------


def test_flux_frame_chunks_are_exact(models):
    preset = get_preset("flux-ae-tiny")
    model = models[preset.name]
    x = _video((2, 3, 7, 32, 24))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    expected, post = model.encode(x, generator=gens)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    latent, posterior = encode_video(model, preset, x, generator=gens, tiling=TilePlan("chunks", 3))
    assert torch.equal(posterior.parameters, post.parameters)
    assert torch.equal(latent, expected)
    assert torch.equal(decode_video(model, preset, latent, tiling=TilePlan("chunks", 2)), model.decode(latent))


@torch.no_grad()
def test_causal_streaming_is_exact_given_clip_statistics(models):
    # With passes = (number of GroupNorms) + 1, norm "clip" has every statistic of the full clip,
    # so what is left to differ is the chunking itself: conv caches, stride alignment, attention
    # keys/values. They must add nothing but float rounding (a missing frame or a misaligned
    # stride shows up as differences of 1e-2 and more).
    preset = get_preset("hunyuan-vae-tiny")
    model = models[preset.name]
    x = _video((2, 3, 13, 16, 24))
    expected = model.quant_conv(model.encoder(x))
    passes = group_norm_count(model.encoder) + 1
    for chunk in (1, 2):
        plan = TilePlan("chunks", chunk, norm="clip", norm_passes=passes)
        _, posterior = encode_video(model, preset, x, tiling=plan)
        assert (posterior.parameters - expected).abs().max() < 1e-5
    latent = model.encode(x, sample=False)[0]
    plan = TilePlan("chunks", 1, norm="clip", norm_passes=group_norm_count(model.decoder) + 1)
    decoded = decode_video(model, preset, latent, tiling=plan)
    assert (decoded - model.decode(latent)).abs().max() < 1e-4  # 22 GroupNorms, each rounding a little


@torch.no_grad()
def test_causal_statistics_are_chunk_size_independent_and_causal(models):
    model = models["hunyuan-vae-tiny"]
    x = _video((1, 3, 17, 16, 16))
    chunked = [stream_encode(model, x, chunk, norm="causal") for chunk in (1, 2, 3)]
    for other in chunked[1:]:
        assert (other - chunked[0]).abs().max() < 1e-5  # convs over other extents round differently
    # Strictly causal: the first 9 frames alone give the first 3 latent frames of the whole clip.
    assert (stream_encode(model, x[:, :, :9], 1, norm="causal") - chunked[0][:, :, :3]).abs().max() < 1e-5
    # Per-chunk statistics depend on the chunk size, and a single chunk is the untiled encode.
    assert (stream_encode(model, x, 1, norm="chunk") - chunked[0]).abs().max() > 1e-3
    single = stream_encode(model, x, 4, norm="chunk")
    assert (single - model.quant_conv(model.encoder(x))).abs().max() < 1e-5


def test_chunk_bounds():
    assert chunk_bounds(17, 1, 4) == [(0, 5), (5, 9), (9, 13), (13, 17)]
    assert chunk_bounds(17, 3, 4) == [(0, 13), (13, 17)]
    assert chunk_bounds(5, 2, 1) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError):
        chunk_bounds(17, 0, 4)


@pytest.mark.parametrize("plan", [TilePlan("chunks", 1), TilePlan("chunks", 1, 32), TilePlan("tiles", 16, 32)])
def test_noise_is_drawn_once_per_item_on_the_whole_latent(models, plan):
    preset = get_preset("hunyuan-vae-tiny")
    model = models[preset.name]
    x = _video((2, 3, 17, 40, 40))
    latent, posterior = encode_video(
        model, preset, x, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], tiling=plan
    )
    noise = torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(6))
    expected = preset.scale_factor * (posterior.mean[1] + posterior.std[1] * noise - preset.shift_factor)
    assert torch.allclose(latent[1], expected, atol=1e-6)
    alone, _ = encode_video(model, preset, x[1:], generator=[torch.Generator().manual_seed(6)], tiling=plan)
    assert (alone[0] - latent[1]).abs().max() < 1e-5


# -- auto ---------------------------------------------------------------------------------------


# Shapes where every family has room to split in time and in space (planning runs on the meta
# device only, so they can be large).
AUTO_SHAPES = {"autoencoder_2d": (1, 3, 8, 256, 256), "causal_3d": (1, 3, 17, 256, 256), "dc_ae": (1, 3, 64, 512, 512)}


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_prefers_untiled_then_time_then_space(family):
    # Planned for a GPU (plans are shapes only: nothing runs), where a smaller tile never costs more.
    preset = get_preset(FAMILIES[family])
    shape = AUTO_SHAPES[family]

    def plan(budget: float) -> TilePlan:
        return plan_encode(preset, shape, config=TilingConfig("auto", memory_budget=budget), device="cuda")

    untiled = calibrated(estimate_bytes(preset, shape, torch.float32), "cuda")
    assert plan(10 * untiled).untiled
    tight = plan(untiled // 2)
    assert tight.temporal == ("tiles" if family == "dc_ae" else "chunks") and not tight.spatial_tile and tight.fits
    assert tight.estimated_bytes <= untiled // 2
    tiny = plan(untiled // 12)
    assert tiny.spatial_tile and tiny.fits and tiny.estimated_bytes <= untiled // 12, tiny
    latent_shape = (1, preset.latent_channels, *preset.latent_shape(*shape[2:])[1:])
    decode = plan_decode(preset, latent_shape, config=TilingConfig("auto", memory_budget=1), device="cuda")
    assert not decode.fits and decode.spatial_tile  # nothing fits: the cheapest plan tried, flagged


def test_auto_plans_once_per_shape_and_budget():
    """A job plans every batch: the search is cached (the same plan object comes back)."""
    preset = get_preset(FAMILIES["causal_3d"])
    config = TilingConfig("auto", memory_budget=2**30)
    first = plan_encode(preset, AUTO_SHAPES["causal_3d"], config=config, device="cuda")
    assert plan_encode(preset, AUTO_SHAPES["causal_3d"], config=config, device="cuda") is first


def test_auto_without_a_budget_on_cpu_runs_untiled_without_tracing_the_model():
    """CPU memory is unbounded for planning: no estimate is traced (a second per shape at start-up)."""
    preset = get_preset(FAMILIES["causal_3d"])
    plan = plan_encode(preset, AUTO_SHAPES["causal_3d"], config=TilingConfig("auto", norm="chunk"), device="cpu")
    assert plan.untiled and plan.fits and plan.estimated_bytes is None and plan.norm == "chunk"


ESTIMATE_CASES = {
    "autoencoder_2d": ((1, 3, 4, 64, 64), TilePlan("chunks", 1)),
    "causal_3d": ((1, 3, 17, 32, 32), TilePlan("chunks", 1)),
    "dc_ae": ((1, 3, 32, 64, 64), TilePlan("tiles", 16)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_tracks_measured_cpu_peak(models, family):
    preset = get_preset(FAMILIES[family])
    shape, split = ESTIMATE_CASES[family]
    x = _video(shape)
    for plan in (TilePlan(), split):
        _, measured = measure_peak_bytes(
            lambda plan=plan: encode_video(models[preset.name], preset, x, tiling=plan), "cpu"
        )
        estimate = estimate_bytes(preset, shape, torch.float32, plan, device="cpu")
        assert 0.7 * estimate <= measured <= calibrated(estimate, "cpu"), (plan, estimate, measured)


def test_trace_is_the_same_under_inference_mode():
    # The job encodes (and so plans) under torch.inference_mode(), where composite ops reach the
    # tracer whole, and tensors made there skip the decomposition even with the mode off.
    conv = torch.nn.Conv3d(8, 8, 3, padding=1, device="meta")
    x = torch.empty(1, 8, 16, 64, 64, device="meta")
    plain = traced_peak_bytes(lambda: conv(x), "cpu")
    assert plain > 27 * x.numel() * 4  # the CPU kernel's im2col buffer for this small input
    preset, shape = get_preset("dc-ae-tiny"), (1, 3, 32, 128, 128)
    with torch.inference_mode():
        x_inference = torch.empty(1, 8, 16, 64, 64, device="meta")
        assert traced_peak_bytes(lambda: conv(x_inference), "cpu") == plain
        planned = estimate_bytes(preset, shape, torch.float32, TilePlan("tiles", 16, 128), device="cpu")
    assert planned == estimate_bytes(preset, shape, torch.float32, TilePlan("tiles", 16, 128), device="cpu")
    assert estimate_bytes(preset, shape, torch.float32, device="cpu") > 27 * 3 * 32 * 128 * 128 * 4


def test_auto_peak_memory_is_bounded_when_the_clip_doubles(models):
    # Measured for real (CPU allocator events): in auto mode the peak stays under the budget as
    # T doubles, while the untiled encode's peak doubles.
    preset = get_preset("hunyuan-vae-tiny")
    model = models[preset.name]
    short, long = _video((1, 3, 33, 64, 64)), _video((1, 3, 65, 64, 64))
    budget = estimate_bytes(preset, short.shape, torch.float32, device="cpu") // 2
    config = TilingConfig("auto", memory_budget=budget)
    peaks, untiled = [], []
    for x in (short, long):
        assert plan_encode(preset, x.shape, config=config).temporal == "chunks"
        peaks.append(measure_peak_bytes(lambda x=x: encode_video(model, preset, x, tiling=config), "cpu")[1])
        untiled.append(measure_peak_bytes(lambda x=x: encode_video(model, preset, x), "cpu")[1])
    assert untiled[1] > 1.8 * untiled[0]
    assert max(peaks) <= budget
    assert peaks[1] < 1.3 * peaks[0]
