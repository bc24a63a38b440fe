"""The encode/decode entry points: choose a tiling plan for the call, then run it.

    latent, posterior = encode_video(model, preset, x, sample=True, generator=gens, tiling=TilingConfig("auto"))
    video = decode_video(model, preset, latent, tiling=TilingConfig("opensora"))

A `TilingConfig` is turned into a `TilePlan` per input shape (`plan_encode`, `plan_decode`;
the modes are described in `vae/tiling.py`, which runs plans). "auto" searches plans against a
memory budget with `estimate_bytes`: the largest unit of work of a plan is traced on the meta
device through the same code that will run (`vae/memory.py`), and what outlives a unit is
added from the shapes. Plans are cached per shape, so a job with fixed bucket shapes plans once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from vae.memory import available_bytes, calibrated, traced_peak_bytes
from vae.posterior import DiagonalGaussianDistribution
from vae.spec import TilePlan, TilingConfig, VAEPreset
from vae.tiling import (
    axis_ok,
    decode_with_plan,
    drops_frames,
    encode_with_plan,
    extents,
    geometry,
    opensora_plan,
    tile_axis,
    tile_decoder,
    tile_encoder,
)

Shape = tuple[int, int, int, int, int]  # B C T H W
OFF, UNTILED = TilingConfig(), TilePlan()  # defaults


def encode_video(
    model: nn.Module,
    preset: VAEPreset,
    x: Tensor,
    *,
    sample: bool = True,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    tiling: TilingConfig | TilePlan = OFF,
) -> tuple[Tensor, DiagonalGaussianDistribution | None]:
    """Encodes `B C T H W` video in [-1, 1] to scaled latents, split as `tiling` says.

    Args:
        model: The preset's model (as `load_vae` builds it).
        preset: Its preset (family, compression, scaling).
        x: The video; T, H and W must follow the preset's rules.
        sample: Draw from the posterior (variational families) rather than take its mean.
        generator: One generator, or one per batch item; used once on the assembled posterior,
            so each item's noise is independent of the plan and of the rest of the batch.
        tiling: A config (planned here for this shape, on x's device) or a ready plan.

    Returns:
        The latent `B C' T' H' W'` and the posterior over unscaled latents (its `mean` and
        `logvar` are what the job stores; None for the deterministic DC-AE).
    """
    plan = tiling if isinstance(tiling, TilePlan) else plan_encode(preset, tuple(x.shape), x.dtype, tiling, x.device)
    return encode_with_plan(model, preset, x, plan, sample=sample, generator=generator)


def decode_video(
    model: nn.Module, preset: VAEPreset, latent: Tensor, *, tiling: TilingConfig | TilePlan = OFF
) -> Tensor:
    """Decodes scaled latents `B C' T' h w` to video, split as `tiling` says (plans are on the video side)."""
    if isinstance(tiling, TilePlan):
        plan = tiling
    else:
        plan = plan_decode(preset, tuple(latent.shape), latent.dtype, tiling, latent.device)
    return decode_with_plan(model, preset, latent, plan)


def channels_last(model: nn.Module) -> nn.Module:
    """Puts the model's 4D and 5D weights in channels-last order (`channels_last`,
    `channels_last_3d`), in place: its convolutions then run on NHWC / NDHWC kernels, faster on
    most hardware (`benchmarks/encoder.py`), equal up to float rounding."""
    for param in model.parameters():
        if param.dim() in (4, 5):
            fmt = torch.channels_last if param.dim() == 4 else torch.channels_last_3d
            param.data = param.data.contiguous(memory_format=fmt)
    return model


def compile_encoder(model: nn.Module) -> nn.Module:
    """Compiles the model's encoder network in place (`torch.compile`; `nn.Module.compile` keeps its
    parameter names): each new input shape compiles once, then runs the generated kernels. The
    posterior's draw stays outside, with its generators. Equal to eager up to float rounding.

    Raises:
        ValueError: The model has no encoder module to compile.
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):  # a diffusers autoencoder is wrapped (`DiffusersVAE.model`)
        encoder = getattr(getattr(model, "model", None), "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"{type(model).__name__} has no encoder module to compile")
    # Every bucket's batch shape is a graph of its own, and a shard's last batch another; the default
    # limit (8) would send the rest back to eager without a word.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    encoder.compile(dynamic=False)
    return model


def channels_last_input(preset: VAEPreset, x: Tensor) -> Tensor:
    """`B C T H W` video in the layout a channels-last model of `preset` takes: `channels_last_3d`
    for a 3D model; unchanged for a 2D one, which folds the frames into the batch itself."""
    if preset.temporal_compression == 1 and not preset.causal:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d)


# -- planning -------------------------------------------------------------------------------


def plan_encode(
    preset: VAEPreset,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    config: TilingConfig = OFF,
    device: torch.device | str = "cpu",
) -> TilePlan:
    """The plan `encode_video` runs for a `B C T H W` input under `config`."""
    return _plan(preset, tuple(shape), dtype, config, torch.device(device), True)


def plan_decode(
    preset: VAEPreset,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    config: TilingConfig = OFF,
    device: torch.device | str = "cpu",
) -> TilePlan:
    """The plan `decode_video` runs for a `B C' T' h w` latent under `config`."""
    return _plan(preset, tuple(shape), dtype, config, torch.device(device), False)


def _plan(
    preset: VAEPreset, shape: Shape, dtype: torch.dtype, config: TilingConfig, device: torch.device, encode: bool
) -> TilePlan:
    if config.mode == "off":
        return TilePlan()
    if config.mode == "opensora":
        return opensora_plan(preset, config)
    if preset.family.opensora is None:  # a family that is never split (a diffusers VAE) runs whole
        return TilePlan()
    budget = config.memory_budget if config.memory_budget is not None else available_bytes(device)
    if math.isinf(budget):  # unbounded (CPU without a budget): untiled, and no trace to estimate it
        return _untiled(config)
    return _auto_plan(preset, shape, dtype, config, budget, device.type, encode)


def _untiled(config: TilingConfig) -> TilePlan:
    """The whole call at once, with the config's overlap and norm for any split made from it."""
    return TilePlan(
        overlap=0.25 if config.overlap is None else config.overlap, norm=config.norm, norm_passes=config.norm_passes
    )


@functools.lru_cache(maxsize=256)
def _auto_plan(
    preset: VAEPreset, shape: Shape, dtype: torch.dtype, config: TilingConfig, budget: float, device: str, encode: bool
) -> TilePlan:
    """Untiled if it fits; else the largest temporal split that fits; else spatial tiles too.

    If nothing fits, the cheapest plan tried, flagged `fits=False` (on CPU a smaller tile can
    cost more than a larger one, see vae/memory.py, so that is not always the smallest).
    """
    base = _untiled(config)
    overlap = base.overlap
    sc, tc = preset.spatial_compression, preset.temporal_compression
    tried: dict[TilePlan, int] = {}

    def cost(plan: TilePlan) -> int:
        if plan not in tried:
            tried[plan] = calibrated(estimate_bytes(preset, shape, dtype, plan, encode, device), device)
        return tried[plan]

    def done(plan: TilePlan) -> TilePlan:
        estimate = cost(plan)
        return replace(plan, estimated_bytes=estimate, fits=estimate <= budget)

    if cost(base) <= budget:
        return done(base)

    # Temporal splits, ascending: exact chunks where the family allows them, else overlapped tiles.
    if preset.family.temporal_split == "tiles":
        frames = shape[2] if encode else preset.decoded_frames(shape[2])
        kind, sizes = "tiles", _valid_sizes(frames, 4 * tc, lambda s: axis_ok(s, tc, overlap, encode))
        if not encode:
            sizes = [s for s in sizes if not drops_frames(preset, shape[2], tile_axis(s // tc, s, tc, overlap, False))]
    else:
        latent_frames = preset.latent_frames(shape[2]) if encode else shape[2]
        # A causal chunk of k latent frames comes after a first chunk of k + 1: at least two chunks.
        kind, sizes = "chunks", list(range(1, latent_frames - 1 if preset.causal else latent_frames))
    sides = max(shape[3:]) * (1 if encode else sc)
    tiles = _valid_sizes(sides, 4 * sc, lambda s: axis_ok(s, sc, overlap, encode))

    def plan(size: int = 0, tile: int = 0) -> TilePlan:
        return replace(base, temporal=kind if size else "none", temporal_size=size, spatial_tile=tile)

    size = _largest(sizes, lambda s: cost(plan(s)) <= budget)
    if size is not None:
        return done(plan(size))
    smallest = sizes[0] if sizes else 0
    tile = _largest(tiles, lambda t: cost(plan(smallest, t)) <= budget)
    if tile is None:  # nothing fits: the cheapest plan tried, marked as not fitting
        cost(plan(smallest, tiles[0] if tiles else 0))
        return done(min(tried, key=tried.__getitem__))
    size = _largest(sizes, lambda s: cost(plan(s, tile)) <= budget) or smallest
    return done(plan(size, tile))


def _valid_sizes(below: int, step: int, ok: Callable[[int], bool]) -> list[int]:
    """Multiples of `step` under `below` that `ok` accepts, ascending."""
    return [s for s in range(step, below, step) if ok(s)]


def _largest(values: list[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of ascending `values` that fits, by bisection (memory grows with the value)."""
    lo, hi, best = 0, len(values) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(values[mid]):
            best, lo = values[mid], mid + 1
        else:
            hi = mid - 1
    return best


# -- memory estimate ------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _meta_model(preset: VAEPreset, dtype: torch.dtype) -> nn.Module:
    # Never inference tensors (the job plans under inference mode): composite ops on those reach
    # the tracer undecomposed, hiding their temporaries.
    with torch.inference_mode(False), torch.device("meta"):
        return preset.build().to(dtype).eval().requires_grad_(False)


def estimate_bytes(
    preset: VAEPreset,
    shape: Sequence[int],
    dtype: torch.dtype,
    plan: TilePlan = UNTILED,
    encode: bool = True,
    device: str = "cuda",
) -> int:
    """Peak activation bytes of `encode_video` (or `decode_video`) for `shape` under `plan`, uncalibrated.

    The largest unit of work (the whole call if untiled; else one spatial tile of one temporal
    tile, or the first two chunks of a causal stream, or one FLUX chunk) is traced on the meta
    device through the same code (`vae/memory.py`). What outlives a unit is added from the
    shapes: the assembled output, the tiles kept for blending, a stream's keys/values and
    outputs for the frames after the traced ones, and the posterior tensors. Tracing costs
    ~0.1 ms per op, so only a unit is traced (and each estimate is cached). `vae.memory.calibrated`
    adds the device's overhead.
    """
    return _estimate(preset, tuple(shape), dtype, replace(plan, estimated_bytes=None, fits=True), encode, device)


@functools.lru_cache(maxsize=1024)
def _estimate(preset: VAEPreset, shape: Shape, dtype: torch.dtype, plan: TilePlan, encode: bool, device: str) -> int:
    with torch.inference_mode(False):  # meta inputs must not be inference tensors (see _meta_model)
        return _traced_estimate(preset, shape, dtype, plan, encode, device)


def _traced_estimate(
    preset: VAEPreset, shape: Shape, dtype: torch.dtype, plan: TilePlan, encode: bool, device: str
) -> int:
    model = _meta_model(preset, dtype)
    b, c, t, h, w = shape
    if plan.untiled:
        x = torch.empty(tuple(shape), device="meta", dtype=dtype)
        if encode:
            return traced_peak_bytes(lambda: encode_video(model, preset, x, sample=True, tiling=plan), device)
        return traced_peak_bytes(lambda: decode_video(model, preset, x, tiling=plan), device)

    spatial, temporal = geometry(preset, plan, encode)
    tiled_t = temporal is not None and t > temporal.size - temporal.causal
    tiled_s = spatial is not None and max(h, w) > spatial.size
    unit_t = temporal.size if tiled_t else t
    unit_h, unit_w = (min(h, spatial.size), min(w, spatial.size)) if tiled_s else (h, w)
    kv_channels = preset.family.stream_kv_channels
    streamed = plan.temporal == "chunks" and kv_channels is not None
    if plan.temporal == "chunks":
        step = plan.temporal_size * (preset.temporal_compression if encode else 1)
        unit_t = min(t, 1 + 2 * step) if streamed else min(t, plan.temporal_size)
    fn = tile_encoder(model, preset, plan) if encode else tile_decoder(model, preset, plan)

    def trace(extent: tuple[int, int, int]) -> tuple[int, Tensor]:
        x = torch.empty((b, c, *extent), device="meta", dtype=dtype)
        result: list[Tensor] = []
        return traced_peak_bytes(lambda: result.append(fn(x)), device), result[0]

    peak, unit_out = trace((unit_t, unit_h, unit_w))
    if device == "cpu":
        # On CPU a shorter edge tile can cost more than a full one: below a size threshold
        # PyTorch switches to a convolution with a much larger scratch buffer (vae/memory.py).
        ts = extents(t, temporal.size, temporal.stride) if tiled_t else [unit_t]
        hs = extents(h, spatial.size, spatial.stride) if tiled_s else [unit_h]
        ws = extents(w, spatial.size, spatial.stride) if tiled_s else [unit_w]
        edges = {(ti, hi, wi) for ti in ts for hi in hs for wi in ws} - {(unit_t, unit_h, unit_w)}
        peak = max([peak] + [trace(extent)[0] for extent in edges])
    elem = unit_out.element_size()
    sc = preset.spatial_compression
    if encode:
        out_extent = preset.latent_shape(t, h, w)[1:]
    else:
        out_extent = (preset.decoded_frames(t), h * sc, w * sc)
    per_position = unit_out.numel() // math.prod(unit_out.shape[2:]) * elem  # bytes per output position
    held = per_position * math.prod(out_extent)  # the assembled output
    unit_bytes = unit_out.numel() * elem
    if tiled_t:  # the previous temporal tile, and the current one while it is assembled in space
        held += 2 * unit_bytes * (out_extent[1] * out_extent[2]) // math.prod(unit_out.shape[3:])
    if tiled_s:  # the row of tiles above and the current row
        held += 2 * math.ceil(w / spatial.stride) * unit_bytes
    if streamed:  # keys/values and outputs of the frames after the two traced chunks
        assert kv_channels is not None
        latent_frames = t if not encode else out_extent[0]
        later = latent_frames - (preset.latent_frames(unit_t) if encode else unit_t)
        latent_area = (unit_h // sc) * (unit_w // sc) if encode else unit_h * unit_w
        kv = 2 * b * latent_area * kv_channels(preset.params) * elem
        out_per_latent_frame = unit_bytes // unit_out.shape[2] * (1 if encode else preset.temporal_compression)
        held += later * (kv + out_per_latent_frame)
    if encode and preset.variational:  # clamped log-variance, std, var, noise, sample, scaled latent
        held += 3 * per_position * math.prod(out_extent)
    return peak + held
