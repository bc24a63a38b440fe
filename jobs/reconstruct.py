"""Decode stored latents back to video and measure them against their source videos.

    python -m jobs.reconstruct --latents demo/latents --output demo/reconstructions --limit 4
    python -m jobs.reconstruct --latents DIR --output REPORT_DIR --keys clip-000003,clip-000010 \\
        [--checkpoint FILE] [--device cpu|cuda] [--preview-frames 8] [--allow-shell]

The VAE is rebuilt from what `DIR/job.json` recorded (preset, checkpoint and its sha256,
compute dtype; random-init jobs from the same seed). Each sample's latents are read by
seeking to their byte range, decoded, and saved like Open-Sora's `save_sample` (8 bit,
H.264 crf 23; one frame as PNG) at the clip's fps. The source video is read again from the
sample's input shard (each shard once) and decoded with the job's video settings, so the
original is frame-aligned with the reconstruction. Written into REPORT_DIR:

    videos/<key>.mp4      the reconstructions
    previews/<key>.png    original frames (top row) over reconstructed ones (bottom row)
    report.json           per-sample PSNR/SSIM and paths, means, the VAE used
    report.md             the same as a table

Metrics compare the clip the VAE was given (float, [0, 1]) with the reconstruction as the
8-bit pixels handed to the video encoder (the H.264 file itself is for viewing): PSNR in dB
over all pixels, frames and RGB channels; SSIM (`jobs.quality.metrics`) on BT.601 luma, per
frame, averaged over frames. Exit status: 0 done; 2 unusable input (not a latent dataset, unknown
key, missing source shard or checkpoint, checkpoint with another sha256), with a one-line
reason; 1 on any other failure, with its traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jobs.dataset.catalog import DatasetError, read_job
from jobs.dataset.layout import JOB_FILE
from jobs.dataset.reader import load_sample, read_metadata
from jobs.dataset.store import Store, open_store
from jobs.inputs.shards import Shard, storage_for
from jobs.inputs.tar_samples import ShardReadError, read_shard, split_sample
from jobs.inputs.video import VideoError, read_frames
from jobs.orchestration.config import JobConfig, UsageError, from_dict, without_retired
from jobs.orchestration.settings import RecordedVAE, recorded_vae, usable_preset
from jobs.quality.media import preview_grid, save_clip, to_uint8, write_png
from jobs.quality.metrics import luma, psnr, ssim
from vae import CheckpointError, TilingConfig, VAEPreset, decode_video, load_vae
from vae.registry import RANDOM_INIT

DEFAULT_LIMIT = 8
SSIM_WINDOW = 11


@dataclass
class Job:
    root: Store  # the latents: a local directory or s3://
    config: JobConfig
    vae: RecordedVAE
    fingerprint: str


@dataclass
class SampleResult:
    key: str
    source: str
    num_frames: int
    height: int
    width: int
    fps: float
    psnr: float
    ssim: float | None  # None when the frames are smaller than the SSIM window
    video: str  # relative to the report directory
    preview: str


def load_job(root: str | Path) -> Job:
    """Reads `DIR/job.json`, the resolved config and settings of a precompute job (DIR local or s3://)."""
    try:
        store = open_store(root)
        record = read_job(store)
        config = from_dict(JobConfig, without_retired(record.config))
        return Job(store, config, recorded_vae(record.settings), record.fingerprint)
    except DatasetError as e:
        raise UsageError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{root}/{JOB_FILE} is not a precompute job file ({type(e).__name__}: {e})") from None


def build_model(job: Job, checkpoint: str | None, device: torch.device) -> tuple[nn.Module, VAEPreset, str]:
    """The job's VAE with the job's weights; returns it, its preset and a description of the weights.

    Raises:
        UsageError: Unknown or changed preset, missing checkpoint, or a checkpoint whose sha256
            is not the one recorded by the job.
    """
    vae = job.config.vae
    preset = usable_preset(vae.name)
    changed = job.vae.changes(preset)
    if changed:
        raise UsageError(f"VAE preset '{vae.name}' is not the one the job used (changed: {', '.join(changed)})")
    expected = job.vae.sha256
    dtype = getattr(torch, job.vae.dtype)
    if preset.weights and checkpoint:
        raise UsageError(f"'{vae.name}' is a model folder: it is its own checkpoint (no --checkpoint)")
    path = checkpoint or vae.checkpoint or preset.weights or None  # a diffusers folder is its own checkpoint
    if path is None:
        model = load_vae(preset, None, device=device, dtype=dtype, seed=vae.seed)
        return model, preset, f"random init, seed {vae.seed}"
    if not os.path.exists(path):
        hint = "" if checkpoint else " (the job's checkpoint; pass --checkpoint FILE if it moved)"
        raise UsageError(f"checkpoint not found: {path}{hint}")
    sha = preset.family.weights_sha256(path)
    if sha != expected:
        made_with = "random weights" if expected.startswith(RANDOM_INIT) else f"sha256 {expected[:12]}..."
        raise UsageError(
            f"{path} (sha256 {sha[:12]}...) is not the checkpoint these latents were made with ({made_with})"
        )
    try:
        model = load_vae(preset, None if preset.weights else path, device=device, dtype=dtype)
        return model, preset, f"{path} (sha256 {sha[:12]}...)"
    except CheckpointError as e:
        raise UsageError(str(e)) from None


def select_rows(root: Store, keys: list[str] | None, limit: int) -> list[dict[str, Any]]:
    """The `ok` rows to reconstruct: those with the given keys, else the first `limit` (0 = all)."""
    try:
        rows = read_metadata(root).to_pylist()
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"{root} has no readable metadata ({e})") from None
    rows.sort(key=lambda r: (r["shard"] or "", r["index"], r.get("clip") or 0))
    ok = [r for r in rows if r["status"] == "ok"]
    if keys is None:
        if not ok:
            raise UsageError(f"{root} has no samples with status 'ok' ({len(rows)} rows)")
        return ok[:limit] if limit else ok
    chosen = []
    for key in keys:
        matches = [r for r in rows if r["key"] == key]
        if not matches:
            examples = ", ".join(r["key"] for r in ok[:3])
            raise UsageError(f"unknown key '{key}' ({len(ok)} ok samples, e.g. {examples})")
        if not any(r["status"] == "ok" for r in matches):
            raise UsageError(f"sample '{key}' has no latents: {matches[0]['error']}")
        chosen += [r for r in matches if r["status"] == "ok"]
    return chosen


def check_sources(sources: list[str], allow_shell: bool = False) -> None:
    """Fails early, before any model work, if a source cannot be opened under the policy of the
    job's own `--input` (a `pipe:` source named by the data runs only with `--allow-shell`), or if
    a local source shard is gone."""
    for source in dict.fromkeys(sources):
        try:
            storage_for(source, allow_shell)
        except ValueError as e:
            raise UsageError(f"source shard of the metadata: {e}") from None
        if Shard(source, "").is_local and not os.path.isfile(source):
            raise UsageError(f"source shard {source} is missing (moved or deleted since the job ran?)")


def read_sources(
    rows: list[dict[str, Any]], extensions: list[str], allow_shell: bool = False
) -> dict[tuple[str, str], bytes]:
    """The source video bytes of each row, `(source, key) -> bytes`, reading each shard once."""
    wanted: dict[str, set[str]] = {}
    for row in rows:
        wanted.setdefault(row["source"], set()).add(row["key"])
    check_sources(list(wanted), allow_shell)
    videos = {}
    for source, keys in wanted.items():
        errors: list[str] = []
        try:
            for raw in read_shard(source, errors.append, allow_shell=allow_shell):
                if raw.key in keys and (source, raw.key) not in videos:  # the first of duplicate keys was encoded
                    parts = split_sample(raw, extensions)
                    if parts.video is None:
                        raise UsageError(f"sample '{raw.key}' of {source}: {parts.problem}")
                    videos[source, raw.key] = parts.video
                    if all((source, k) in videos for k in keys):
                        break  # the rest of the shard is not needed
        except ShardReadError as e:
            raise UsageError(f"source shard {source} cannot be read: {e}") from None
        missing = sorted(k for k in keys if (source, k) not in videos)
        if missing:
            why = f"read error: {errors[0]}" if errors else "not in the shard; was it changed since the job ran?"
            raise UsageError(f"source shard {source}: cannot find sample '{missing[0]}' ({why})")
    return videos


MAX_STEM = 120  # bytes: `<stem>.mp4` / `<stem>.png` stay far below the 255 of most filesystems


def stem_for(key: str, used: set[str]) -> str:
    """A file name for a key: path separators flattened, made unique among `used`.

    A key that is long or holds characters unfit for a file name (control characters, a leading
    dot) is shortened and given a hash of the key, so the name stays traceable to its row.
    """
    base = key.replace("/", "__") or "sample"
    if len(base.encode()) > MAX_STEM or base.startswith(".") or re.search(r"[\x00-\x1f\x7f\\]", base):
        digest = hashlib.sha256(key.encode("utf-8", "backslashreplace")).hexdigest()[:12]
        clean = re.sub(r"[\x00-\x1f\x7f\\]", "_", base).lstrip(".") or "sample"
        base = f"{clean.encode()[: MAX_STEM - 13].decode('utf-8', 'ignore')}~{digest}"
    stem, n = base, 1
    while stem in used:
        n += 1
        stem = f"{base}-{n}"
    used.add(stem)
    return stem


@torch.inference_mode()
def decode(model: nn.Module, preset: VAEPreset, latent: Tensor, tiling: TilingConfig, device: torch.device) -> Tensor:
    """Decodes one stored `C T H W` latent to a `C T H W` float32 clip on the CPU (tiled as the job was)."""
    dtype = next(model.parameters()).dtype
    return decode_video(model, preset, latent[None].to(device, dtype), tiling=tiling)[0].float().cpu()


def measure(original: Tensor, recon: Tensor) -> tuple[float, float | None]:
    """PSNR and mean per-frame luma SSIM of a reconstruction (both `C T H W` in [-1, 1])."""
    ref = (original.float() + 1) / 2
    rec = to_uint8(recon).float() / 255  # the pixels that are saved
    score = psnr(rec, ref)
    if min(ref.shape[-2:]) < SSIM_WINDOW:
        return score, None
    frames = ssim(luma(rec.transpose(0, 1)), luma(ref.transpose(0, 1)))  # T
    return score, frames.mean().item()


def reconstruct(
    job: Job,
    rows: list[dict[str, Any]],
    model: nn.Module,
    preset: VAEPreset,
    device: torch.device,
    output: Path,
    preview_frames: int,
    allow_shell: bool = False,
) -> list[SampleResult]:
    """Decodes, saves, previews and measures every row."""
    videos = read_sources(rows, job.config.video.extensions, allow_shell)
    results, used = [], set()
    for row in rows:
        key = row["key"]
        latent = load_sample(job.root, row)["latent"]
        recon = decode(model, preset, latent, job.config.tiling(), device)
        try:
            frames = row.get("frame_indices") or list(range(row["num_frames"]))  # the source frames it encoded
            resize = job.config.video.resize
            clip = read_frames(videos[row["source"], key], frames, row["height"], row["width"], resize)
        except VideoError as e:
            raise UsageError(f"source video of '{key}' in {row['source']} cannot be decoded now: {e}") from None
        if recon.shape != clip.shape:
            shapes = f"reconstruction {tuple(recon.shape)}, clip {tuple(clip.shape)}"
            raise RuntimeError(f"'{key}': the decoded latents do not match the source clip ({shapes})")
        stem = stem_for(key if not row.get("clip") else f"{key}_c{row['clip']:03d}", used)
        video = save_clip(recon, output / "videos" / stem, row["fps"])
        preview = output / "previews" / f"{stem}.png"
        preview.parent.mkdir(parents=True, exist_ok=True)
        write_png(preview, preview_grid(clip, recon, preview_frames))
        score, structure = measure(clip, recon)
        c, t, h, w = clip.shape
        results.append(
            SampleResult(
                key=key,
                source=row["source"],
                num_frames=t,
                height=h,
                width=w,
                fps=row["fps"],
                psnr=score,
                ssim=structure,
                video=str(video.relative_to(output)),
                preview=str(preview.relative_to(output)),
            )
        )
        print(f"  {key}: PSNR {score:.2f} dB, SSIM {_fmt(structure, 4)}", file=sys.stderr)
    return results


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isinf(x) else round(x, 4)


def _fmt(x: float | None, digits: int) -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def write_report(output: Path, job: Job, weights: str, device: torch.device, results: list[SampleResult]) -> dict:
    """Writes `report.json` and `report.md`; returns the JSON content."""
    mean_psnr, mean_ssim = _mean([r.psnr for r in results]), _mean([r.ssim for r in results])
    report = {
        "latents": job.root.url,
        "fingerprint": job.fingerprint,
        "vae": job.config.vae.name,
        "weights": weights,
        "dtype": job.vae.dtype,
        "device": str(device),
        "metrics": {
            "psnr": "dB over all pixels, frames and RGB channels in [0, 1]; null = identical",
            "ssim": "BT.601 luma, 11x11 Gaussian window (sigma 1.5), per frame, mean over frames",
            "compared": "the clip given to the VAE vs the 8-bit reconstruction (before H.264)",
        },
        "mean": {"psnr": _finite(mean_psnr), "ssim": _finite(mean_ssim)},
        "samples": [{**asdict(r), "psnr": _finite(r.psnr), "ssim": _finite(r.ssim)} for r in results],
    }
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Reconstructions of `{report['latents']}`",
        "",
        f"VAE `{report['vae']}` ({report['dtype']} on {report['device']}), weights: {weights}",
        "",
        "PSNR over RGB; SSIM on luma, per frame, averaged. Previews: original frames on top, reconstruction below.",
        "",
        "| key | frames | size | fps | PSNR (dB) | SSIM | video | preview |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.key} | {r.num_frames} | {r.width}x{r.height} | {r.fps:g} | {_fmt(r.psnr, 2)} | "
            f"{_fmt(r.ssim, 4)} | [{Path(r.video).name}]({r.video}) | [{Path(r.preview).name}]({r.preview}) |"
        )
    lines.append(f"| **mean** ({len(results)}) | | | | **{_fmt(mean_psnr, 2)}** | **{_fmt(mean_ssim, 4)}** | | |")
    (output / "report.md").write_text("\n".join(lines) + "\n")
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.reconstruct", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--latents", required=True, metavar="DIR", help="output directory of a precompute job")
    p.add_argument("--output", required=True, metavar="REPORT_DIR", help="where videos, previews and reports go")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N", help="first N ok samples (0 = all)")
    which.add_argument("--keys", metavar="K1,K2", help="comma-separated sample keys")
    p.add_argument("--checkpoint", metavar="FILE", help="the job's VAE weights, if they moved (sha256 is checked)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--preview-frames", type=int, default=8, metavar="N", help="frames per preview row")
    p.add_argument(
        "--allow-shell",
        "--allow-pipe",
        dest="allow_shell",
        action="store_true",
        help="let sources that are pipe: commands run them (the metadata names them: refused otherwise)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        if args.limit < 0 or args.preview_frames < 1:
            raise UsageError("--limit must be 0 or more and --preview-frames at least 1")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda, but CUDA is not available")
        job = load_job(args.latents)
        keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
        rows = select_rows(job.root, keys, args.limit)
        check_sources([r["source"] for r in rows], args.allow_shell)
        model, preset, weights = build_model(job, args.checkpoint, device)
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        print(f"reconstructing {len(rows)} samples of {job.root} with {job.config.vae.name}", file=sys.stderr)
        results = reconstruct(job, rows, model, preset, device, output, args.preview_frames, args.allow_shell)
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = write_report(output, job, weights, device, results)
    mean = report["mean"]
    print(
        f"{len(results)} samples in {time.monotonic() - started:.0f}s: "
        f"mean PSNR {_fmt(_mean([r.psnr for r in results]), 2)} dB, "
        f"mean SSIM {_fmt(mean['ssim'], 4)} (luma)\n"
        f"report: {output / 'report.md'} (and report.json)\n"
        f"videos: {output / 'videos'}/  previews: {output / 'previews'}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
