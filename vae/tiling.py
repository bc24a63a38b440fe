"""Tiled and chunked encode/decode: Open-Sora's tile arithmetic and running a `TilePlan`.

`vae/codec.py` holds the entry points (`encode_video`, `decode_video`) and chooses the plan;
`TilingConfig` and `TilePlan` are in `vae/spec.py`. What a family runs on one unit of work, and
which splits it allows, is its `VAEFamily` (`vae/families.py`): nothing here tests a family.

Modes (`TilingConfig.mode`):

- "off": `model.encode` / `model.decode` as they are.
- "opensora": Open-Sora's own tiled encode and decode, reproduced exactly for the family: which
  tiles are encoded (tile starts at multiples of the stride up to the edge, the last tiles
  cut short), the blend extent (`int(tile_out * overlap)`), the cross-fade weights
  `1 - i/extent` and `i/extent` applied tile by tile in the reference's order (each tile
  blended in place with the one above, then the one to its left; in time with the previous
  tile), and the crop of each tile to `tile_out - blend` (causal temporal tiles: one more
  frame, and later tiles drop their first frame). By default the switches, tile sizes and
  overlap of Open-Sora's training configs (the family's `opensora`); each can be overridden.
- "auto": the cheapest plan whose estimated peak fits `memory_budget`: untiled if it fits;
  else exact temporal chunks (FLUX: frames; causal VAE: streaming with carried caches, see
  `vae/causal_3d_stream.py`); else overlapped temporal tiles (DC-AE, whose linear attention
  spans the whole clip, cannot be chunked exactly); spatial tiles only when a single
  chunk or temporal tile of the whole frame does not fit.

What is exact: FLUX frame chunks (frames are independent); causal streaming in everything but
the GroupNorm statistics (see `vae/causal_3d_stream.py` for the choice made there); untiled
plans. What is not: every overlapped tile (spatial or temporal), by construction, as in
Open-Sora, because each tile sees only its own context and its own normalisation statistics.

Posterior sampling happens once on the assembled posterior, so per-item generators give each
item the same noise whatever the plan or the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vae.posterior import DiagonalGaussianDistribution
from vae.spec import TilePlan, TilingConfig, VAEPreset

# -- Open-Sora's tile arithmetic ------------------------------------------------------------


@dataclass(frozen=True)
class TileAxis:
    """Tiles along one axis: input extent and stride, and what is blended and kept of each output."""

    size: int  # input positions per tile
    stride: int  # input positions between tile starts
    blend: int  # output positions cross-faded with the previous tile
    keep: int  # output positions kept from each tile after blending
    causal: bool = False  # tiles read one more frame; later tiles drop their first output, the first keeps one more


def tile_axis(tile_in: int, tile_out: int, ratio: int, overlap: float, encode: bool, causal: bool = False) -> TileAxis:
    """Open-Sora's geometry: stride `int(tile_in * (1 - overlap))`, blend `int(tile_out * overlap)`.

    `tile_in` and `tile_out` are a tile's sizes on the input and the output side (a causal tile
    reads one more frame). Raises ValueError where that arithmetic would not tile the output
    seamlessly: a stride on the input side must be exactly the `keep` positions on the output side.
    """
    stride = int(tile_in * (1 - overlap))
    blend = int(tile_out * overlap)
    keep = tile_out - blend
    if encode:
        seamless = tile_in == tile_out * ratio and stride % ratio == 0 and stride // ratio == keep
    else:
        seamless = tile_out == tile_in * ratio and stride * ratio == keep
    if tile_in < 1 or stride < 1 or keep < 1 or not seamless:
        raise ValueError(
            f"a tile of {tile_in} ({tile_out} on the other side) with overlap {overlap} does not tile evenly "
            f"at compression {ratio}: stride {stride}, blend {blend}, {keep} positions kept per tile"
        )
    return TileAxis(tile_in + causal, stride, blend, keep, causal)


def _blend(prev: Tensor, cur: Tensor, extent: int, dim: int) -> None:
    """Open-Sora's linear cross-fade, in place on `cur`: position i of the first `extent`
    becomes prev[i - extent] * (1 - i/extent) + cur[i] * (i/extent)."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    for i in range(extent):
        cur.select(dim, i).copy_(prev.select(dim, i - extent) * (1 - i / extent) + cur.select(dim, i) * (i / extent))


def spatial_tiles(fn: Callable[[Tensor], Tensor], x: Tensor, axis: TileAxis, out_hw: tuple[int, int]) -> Tensor:
    """Runs `fn` on overlapping square tiles of `B C T H W` and blends the results.

    Tiles start at every multiple of the stride below H (and W); each tile's output is
    blended with the tile above and then the tile to its left (both already blended), and
    cropped to `keep` rows and columns, as Open-Sora's `spatial_tiled_encode/decode` do. Only
    the previous row of tiles is held; the result is written into one tensor of `out_hw`.
    """
    height, width = x.shape[-2:]
    out: Tensor | None = None
    above: list[Tensor] = []
    top = left = 0
    for y0 in range(0, height, axis.stride):
        row: list[Tensor] = []
        left = 0
        for j, x0 in enumerate(range(0, width, axis.stride)):
            tile = fn(x[..., y0 : y0 + axis.size, x0 : x0 + axis.size])
            if above:
                _blend(above[j], tile, axis.blend, dim=-2)
            if row:
                _blend(row[-1], tile, axis.blend, dim=-1)
            row.append(tile)
            part = tile[..., : axis.keep, : axis.keep]
            if out is None:
                out = tile.new_empty(*tile.shape[:-2], *out_hw)
            out[..., top : top + part.shape[-2], left : left + part.shape[-1]] = part
            left += part.shape[-1]
        top += row[0][..., : axis.keep, :].shape[-2]
        above = row
    assert out is not None and (top, left) == out_hw, f"spatial tiles covered {top}x{left} of {out_hw}"
    return out


def temporal_tiles(fn: Callable[[Tensor], Tensor], x: Tensor, axis: TileAxis, out_frames: int) -> Tensor:
    """Runs `fn` on overlapping runs of frames of `B C T H W` and blends the results in time.

    As Open-Sora's `temporal_tiled_encode/decode`: a tile starts at every multiple of the stride
    below T; causal tiles read one extra frame and, after the first, drop their first output
    frame (the re-encoded frame before the tile); each tile is blended with the previous one and
    cropped to `keep` frames (the first causal tile to keep + 1).
    """
    out: Tensor | None = None
    prev: Tensor | None = None
    filled = 0
    for i, start in enumerate(range(0, x.shape[2], axis.stride)):
        tile = fn(x[:, :, start : start + axis.size])
        if axis.causal and i > 0:
            tile = tile[:, :, 1:]
        if prev is not None:
            _blend(prev, tile, axis.blend, dim=2)
        part = tile[:, :, : axis.keep + (axis.causal and i == 0)]
        if out is None:
            out = tile.new_empty(*tile.shape[:2], out_frames, *tile.shape[3:])
        out[:, :, filled : filled + part.shape[2]] = part
        filled += part.shape[2]
        prev = tile
    assert out is not None and filled == out_frames, f"temporal tiles gave {filled} of {out_frames} frames"
    return out


# -- what runs on one unit of work (the family says how) ----------------------------------------


def tile_encoder(model: nn.Module, preset: VAEPreset, plan: TilePlan) -> Callable[[Tensor], Tensor]:
    """Encodes a clip (a whole one or a tile) to what Open-Sora blends: posterior parameters
    for the variational families, scaled latents for the others (the DC-AE scales each tile)."""
    family = preset.family
    if plan.temporal == "chunks" and family.encode_chunks is not None:
        chunks = family.encode_chunks
        return lambda x: chunks(model, x, plan)
    if family.encode_unit is None:
        raise ValueError(f"VAE family {family.name!r} is never tiled")
    unit = family.encode_unit
    return lambda x: unit(model, x)


def tile_decoder(model: nn.Module, preset: VAEPreset, plan: TilePlan) -> Callable[[Tensor], Tensor]:
    """Decodes scaled latents (a clip or a tile). Scaling is elementwise, so scaling each tile
    equals Open-Sora's scaling before tiling (causal VAE) or inside each tile (DC-AE)."""
    chunks = preset.family.decode_chunks
    if plan.temporal == "chunks" and chunks is not None:
        return lambda z: chunks(model, z, plan)
    return model.decode


def in_frame_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, size: int) -> Tensor:
    """`fn` on runs of `size` frames of `B C T H W` (all at once if they fit), for frame-independent models."""
    if size >= x.shape[2]:
        return fn(x)
    out: Tensor | None = None
    for start in range(0, x.shape[2], size):
        part = fn(x[:, :, start : start + size])
        if out is None:
            out = part.new_empty(*part.shape[:2], x.shape[2], *part.shape[3:])
        out[:, :, start : start + part.shape[2]] = part
    assert out is not None
    return out


def geometry(preset: VAEPreset, plan: TilePlan, encode: bool) -> tuple[TileAxis | None, TileAxis | None]:
    """(spatial, temporal) tile axes of a plan; None where it has no tiles."""
    sc, tc = preset.spatial_compression, preset.temporal_compression
    spatial = temporal = None
    if plan.spatial_tile:
        s = plan.spatial_tile
        spatial = (
            tile_axis(s, s // sc, sc, plan.overlap, True) if encode else tile_axis(s // sc, s, sc, plan.overlap, False)
        )
    family = preset.family
    if plan.temporal == "tiles":
        if not family.temporal_tiles:
            raise ValueError(
                f"VAE family {family.name!r} has no temporal tiles (its frames are independent: use chunks)"
            )
        t, causal = plan.temporal_size, preset.causal
        if encode:
            temporal = tile_axis(t, t // tc, tc, plan.overlap, True, causal)
        else:
            temporal = tile_axis(t // tc, t, tc, plan.overlap, False, causal)
    if plan.temporal == "chunks" and family.temporal_split != "chunks":
        raise ValueError(
            f"VAE family {family.name!r} cannot be chunked exactly (its attention spans the clip): use temporal tiles"
        )
    return spatial, temporal


def _run(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    axes: tuple[TileAxis | None, TileAxis | None],
    out_frames: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """Open-Sora's nesting: temporal tiles outside (each tiled in space if needed), else spatial tiles.

    As in Open-Sora, a clip is tiled in space only if H or W exceeds the tile, and in time only
    if it has more frames than a tile (not counting a causal tile's extra frame).
    """
    spatial, temporal = axes
    tile_fn = fn
    if spatial is not None and max(x.shape[-2:]) > spatial.size:

        def tile_fn(t: Tensor) -> Tensor:
            return spatial_tiles(fn, t, spatial, out_hw)

    if temporal is not None and x.shape[2] > temporal.size - temporal.causal:
        return temporal_tiles(tile_fn, x, temporal, out_frames)
    return tile_fn(x)


# -- running a plan ---------------------------------------------------------------------------


@torch.no_grad()
def encode_with_plan(
    model: nn.Module,
    preset: VAEPreset,
    x: Tensor,
    plan: TilePlan,
    *,
    sample: bool = True,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[Tensor, DiagonalGaussianDistribution | None]:
    """Encodes `B C T H W` video in [-1, 1] as `plan` says (`vae.codec.encode_video` plans too).

    The posterior is assembled from the tiles first and sampled once, so per-item generators
    give each item the same noise whatever the plan or the batch.

    Returns:
        The latent `B C' T' H' W'` and the posterior (None for the deterministic DC-AE).
    """
    preset.check_input(*x.shape[2:])
    if plan.untiled:
        return model.encode(x, sample=sample, generator=generator)
    _, t, h, w = preset.latent_shape(*x.shape[2:])
    raw = _run(tile_encoder(model, preset, plan), x, geometry(preset, plan, encode=True), t, (h, w))
    assert raw.shape[2:] == (t, h, w), f"tiled encode gave {tuple(raw.shape)}, expected T'={t} {h}x{w}"
    if not preset.variational:
        return raw, None
    posterior = DiagonalGaussianDistribution(raw)
    return posterior.latent(model.scale_latent, sample, generator), posterior


@torch.no_grad()
def decode_with_plan(model: nn.Module, preset: VAEPreset, latent: Tensor, plan: TilePlan) -> Tensor:
    """Decodes scaled latents `B C' T' h w` to video as `plan` says (sizes on the video side)."""
    if plan.untiled:
        return model.decode(latent)
    sc = preset.spatial_compression
    out_hw = (latent.shape[3] * sc, latent.shape[4] * sc)
    axes = geometry(preset, plan, encode=False)
    if axes[1] is not None and drops_frames(preset, latent.shape[2], axes[1]):
        raise ValueError(
            f"Open-Sora's temporal tiled decode of {latent.shape[2]} latent frames with "
            f"{plan.temporal_size}-frame tiles ends on a 1-frame tile, which decodes to one frame instead of four "
            "(frames would go missing); choose another temporal tile size"
        )
    return _run(tile_decoder(model, preset, plan), latent, axes, preset.decoded_frames(latent.shape[2]), out_hw)


def drops_frames(preset: VAEPreset, latent_frames: int, axis: TileAxis) -> bool:
    """Whether temporal tiles of a non-causal model would end on a lone latent frame, which it
    decodes as an image (one frame instead of `temporal_compression`)."""
    if preset.causal or preset.temporal_compression == 1 or latent_frames <= axis.size:
        return False
    return latent_frames - (latent_frames - 1) // axis.stride * axis.stride == 1


OPENSORA = TilingConfig("opensora")  # Open-Sora's own tiles, with no overrides


def opensora_plan(preset: VAEPreset, config: TilingConfig = OPENSORA) -> TilePlan:
    """Open-Sora's tiling for the preset's family, with the config's overrides."""
    base = preset.family.opensora
    if base is None:
        raise ValueError(f"no Open-Sora tiling for VAE family {preset.family.name!r}; use tiling mode off or auto")
    spatial = base.spatial if config.spatial is None else config.spatial
    temporal = base.temporal if config.temporal is None else config.temporal
    if temporal and not preset.family.temporal_tiles:
        raise ValueError(f"Open-Sora has no temporal tiling for VAE family {preset.family.name!r}")
    return TilePlan(
        temporal="tiles" if temporal else "none",
        temporal_size=config.temporal_tile or base.temporal_tile,
        spatial_tile=(config.spatial_tile or base.spatial_tile) if spatial else 0,
        overlap=base.overlap if config.overlap is None else config.overlap,
    )


def axis_ok(size: int, ratio: int, overlap: float, encode: bool) -> bool:
    try:
        if encode:
            tile_axis(size, size // ratio, ratio, overlap, True)
        else:
            tile_axis(size // ratio, size, ratio, overlap, False)
    except ValueError:
        return False
    return True


def extents(length: int, size: int, stride: int) -> list[int]:
    """The distinct lengths of the tiles along an axis (full tiles and the shorter last ones)."""
    return sorted({min(size, length - start) for start in range(0, length, stride)})
