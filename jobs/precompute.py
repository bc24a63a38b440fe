"""Precompute VAE latents for a WebDataset of videos, on every GPU of a Ray cluster.

    python -m jobs.precompute --input 'data/shard-{000000..000099}.tar' --output out/ --vae flux-ae \\
        --checkpoint weights/ae.safetensors [--config configs/job.yaml] [--set video.num_frames=33]
    ray job submit --working-dir . -- python -m jobs.precompute --input ... --output /shared/out ...
    python -m jobs.precompute --input ... --output out/ --vae diffusers:/models/Wan2.1-T2V-1.3B-Diffusers/vae
    python -m jobs.precompute --list-vaes

Each input shard becomes one latent tar plus one Parquet file under the output directory
(layout in `jobs.dataset`). Shards already committed by an earlier run with the same
settings are skipped, so rerunning the same command resumes an interrupted job. Exit status:
0 when every shard is committed (samples that could not be encoded are error rows, not
failures); 1 when some shard could not be written, or on any unexpected failure (with its
traceback); 2 for unusable arguments or settings, or a checkpoint that does not fit the VAE
(a one-line reason); 130 when interrupted, 143 on SIGTERM (committed shards are kept either way).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.orchestration.config import JobConfig, RunFailed, Terminated, UsageError, load_config
from jobs.orchestration.driver import run
from vae import CheckpointError, list_presets
from vae.diffusers_folder import SUPPORTED_CLASSES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.precompute", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--input", action="append", metavar="SPEC", help="shard path, glob, brace pattern or URL (repeatable)"
    )
    p.add_argument("--output", metavar="DIR", help="output directory (rerun with the same one to resume)")
    p.add_argument("--vae", metavar="NAME", help="VAE preset (see --list-vaes), or diffusers:PATH (a model folder)")
    p.add_argument("--checkpoint", metavar="FILE", help="VAE weights (.safetensors)")
    p.add_argument("--config", metavar="FILE", help="YAML/JSON job config; flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. video.num_frames=33")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)")
    p.add_argument("--workers", type=int, help="encoder actors (default: one per GPU)")
    p.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="GPUs to ask the cluster's autoscaler for; the job starts once the first joins (run.gpus)",
    )
    p.add_argument(
        "--max-error-rate",
        type=float,
        metavar="R",
        help="stop once more than this fraction of samples are error rows (run.max_error_rate, default 0.5)",
    )
    p.add_argument(
        "--allow-shell",
        "--allow-pipe",
        dest="allow_shell",
        action="store_true",
        help="let pipe: inputs run their shell commands (refused otherwise: a SPEC or a config could run anything)",
    )
    p.add_argument("--list-vaes", action="store_true", help="print the VAE presets and their rules, then exit")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    overrides = list(args.set)
    named = {
        "output": args.output,
        "vae.name": args.vae,
        "vae.checkpoint": args.checkpoint,
        "run.address": args.address,
        "run.workers": args.workers,
        "run.gpus": args.gpus,
        "run.max_error_rate": args.max_error_rate,
    }
    # Named flags win over --set, which wins over the config file.
    config = load_config(args.config, overrides)
    for dotted, value in named.items():
        if value is not None:
            section, _, leaf = dotted.rpartition(".")
            setattr(getattr(config, section) if section else config, leaf, value)
    if args.input:
        config.input = list(args.input)
    return config


def print_presets() -> None:
    """Prints every preset's frame, size and scaling rules (`--list-vaes`)."""
    rows = [("name", "family", "t x h x w", "frames", "size", "channels", "scale", "shift", "checkpoint")]
    for p in list_presets():
        tc, sc = p.temporal_compression, p.spatial_compression
        rows.append(
            (p.name, p.family.name, f"{tc}x{sc}x{sc}", p.frame_rule, f"x{p.size_multiple}", str(p.latent_channels))
            + (f"{p.scale_factor:.6g}", f"{p.shift_factor:.6g}", p.checkpoint or "-")
        )
    rows.append(("diffusers:PATH", "diffusers", "from config.json", "", "", "", "", "", "a model folder"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nscaling (z = the VAE's raw latent, latent = what is stored):")
    for p in list_presets():
        print(f"  {p.name}: {p.scaling}")
    classes = ", ".join(SUPPORTED_CLASSES)
    print(f"\ndiffusers:PATH takes a local folder of one of: {classes} (pip install -e '.[diffusers]')")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.list_vaes:
        print_presets()
        return 0
    try:
        summary = run(config_from_args(args), allow_shell=args.allow_shell)
    except (UsageError, CheckpointError) as e:  # found while checking the settings: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # the run could not go on, for a reason one line says
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Terminated:  # a preemption, `ray job stop`
        print("\nterminated (SIGTERM): committed shards are kept; rerun the same command to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("\ninterrupted: committed shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    # Anything else is a failure of the run itself: it propagates with its traceback (exit 1).
    print(summary.text())
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
