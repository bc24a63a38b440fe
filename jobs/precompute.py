"""Precompute VAE latents for a WebDataset of videos, on every GPU of a Ray cluster.

    python -m jobs.precompute --input 'data/shard-{000000..000099}.tar' --output out/ --vae flux-ae \\
        --checkpoint weights/ae.safetensors [--config configs/job.yaml] [--set video.num_frames=33]
    ray job submit --working-dir . -- python -m jobs.precompute --input ... --output /shared/out ...
    python -m jobs.precompute --input ... --output out/ --vae diffusers:/models/Wan2.1-T2V-1.3B-Diffusers/vae
    python -m jobs.precompute --list-vaes

Each input shard becomes one latent tar plus one Parquet file under the output directory
(layout in `jobs.latent_format`). Shards already committed by an earlier run with the same
settings are skipped, so rerunning the same command resumes an interrupted job. Exit status:
0 when every shard is committed (samples that could not be encoded are error rows, not
failures), 1 when some shard could not be written, 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.exceptions

from jobs.config import FORMAT_VERSION, JobConfig, fingerprint, load_config
from jobs.latent_format import (
    JOB_FILE,
    MANIFEST_FILE,
    read_commit,
    remove_temporaries,
    write_json_atomic,
)
from jobs.progress import ProgressBar, format_seconds
from jobs.shards import Shard, count_samples, list_shards
from jobs.worker import Progress, ShardDone, ShardEncoder
from vae import CheckpointError, check_checkpoint, checkpoint_sha256, get_preset, list_presets, resolve_name
from vae.diffusers_vae import SUPPORTED_CLASSES

log = logging.getLogger("jobs.precompute")


class UsageError(ValueError):
    """Arguments or settings that no run could use (exit status 2)."""


@dataclass
class Summary:
    output: str
    fingerprint: str
    ok: int = 0
    errors: int = 0
    frames: int = 0
    seconds: float = 0.0
    shards_written: int = 0
    shards_skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shard name -> reason
    error_reasons: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed

    def text(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        lines = [
            f"done in {format_seconds(self.seconds)}: {self.ok} ok, {self.errors} errors, "
            f"{self.frames} frames encoded ({rate:.1f} frames/s)",
            f"shards: {self.shards_written} written, {self.shards_skipped} already committed, "
            f"{len(self.failed)} failed",
        ]
        for reason in self.error_reasons[:5]:
            lines.append(f"  error row: {reason}")
        if len(self.error_reasons) > 5:
            lines.append(f"  ... and {len(self.error_reasons) - 5} more (status = 'error' in the metadata)")
        for name, reason in self.failed.items():
            lines.append(f"  FAILED shard {name}: {reason}")
        if self.failed:
            lines.append("  rerun the same command to retry the failed shards")
        lines.append(f"output: {self.output}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Planning: settings, fingerprint, output directory


@dataclass
class Plan:
    config: JobConfig  # with vae.dtype and paths resolved
    root: Path
    shards: list[Shard]
    settings: dict[str, Any]  # everything that determines the output bytes
    fingerprint: str
    constants: dict[str, Any]  # columns shared by all rows


def check_config(config: JobConfig) -> list[Shard]:
    """Validates settings that need no cluster; returns the input shards."""
    config.validate()
    config.vae.name = resolve_name(config.vae.name)  # a diffusers folder's path made absolute for the workers
    try:
        preset = get_preset(config.vae.name)
    except (KeyError, ImportError) as e:  # ImportError: a diffusers folder without diffusers installed
        raise UsageError(e.args[0]) from None
    v = config.video
    if v.adapt:
        fitted = (preset.valid_num_frames(v.num_frames),) + tuple(
            s - s % preset.size_multiple for s in (v.height, v.width)
        )
        if fitted != (v.num_frames, v.height, v.width) and all(fitted):
            print(
                f"video.adapt: {v.num_frames} frames {v.height}x{v.width} -> {fitted[0]} frames "
                f"{fitted[1]}x{fitted[2]} (VAE '{preset.name}': frames {preset.frame_rule}, "
                f"size x{preset.size_multiple})",
                file=sys.stderr,
            )
            v.num_frames, v.height, v.width = fitted
    try:
        preset.check_input(v.num_frames, v.height, v.width)
    except ValueError as e:
        raise UsageError(f"{e}; or --set video.adapt=true to fit them") from None
    if config.vae.checkpoint is not None:
        config.vae.checkpoint = os.path.abspath(config.vae.checkpoint)
    check_checkpoint(preset, config.vae.checkpoint)
    return list_shards(config.input)


def make_plan(config: JobConfig, shards: list[Shard], has_gpus: bool) -> Plan:
    config = dataclasses.replace(config, vae=dataclasses.replace(config.vae))
    if config.vae.dtype == "auto":
        config.vae.dtype = "bfloat16" if has_gpus else "float32"
    preset = get_preset(config.vae.name)
    checkpoint = config.vae.checkpoint or preset.weights or None  # a diffusers folder is its own checkpoint
    sha = checkpoint_sha256(checkpoint) if checkpoint else f"random-init-seed-{config.vae.seed}"
    settings = {
        "format_version": FORMAT_VERSION,
        "vae": {**preset.describe(), "checkpoint_sha256": sha, "dtype": config.vae.dtype},
        "sampling": {"sample": config.vae.sample, "seed": config.vae.seed},
        "tiling": dataclasses.asdict(config.vae.tiling),
        "video": dataclasses.asdict(config.video),
        "latents": dataclasses.asdict(config.latents),
    }
    settings = json.loads(json.dumps(settings))  # as job.json will hold it (tuples -> lists)
    fp = fingerprint(settings)
    constants = {
        "fingerprint": fp,
        "vae": preset.name,
        "vae_checkpoint": os.path.basename(checkpoint) if checkpoint else "",
        "vae_checkpoint_sha256": sha,
        "vae_dtype": config.vae.dtype,
        "scale_factor": preset.scale_factor,
        "shift_factor": preset.shift_factor,
        "scaling": preset.scaling,
    }
    return Plan(config, Path(config.output).resolve(), shards, settings, fp, constants)


def prepare_output(plan: Plan) -> None:
    """Creates the output directory, or checks that it holds a job with the same settings."""
    job_file = plan.root / JOB_FILE
    if job_file.exists():
        try:
            previous = json.loads(job_file.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{job_file} is not valid JSON ({e}); is this a latent dataset?") from None
        if previous.get("fingerprint") != plan.fingerprint:
            changed = _differences(previous.get("settings", {}), plan.settings)
            raise UsageError(
                f"{plan.root} holds latents made with other settings ({'; '.join(changed) or 'format'}); "
                "use a new --output directory, or the original settings to resume"
            )
    elif plan.root.exists() and any(plan.root.iterdir()):
        entries = {p.name for p in plan.root.iterdir()} - {".lock"}
        if entries:
            raise UsageError(f"{plan.root} is not empty and is not a latent dataset (no {JOB_FILE})")
    removed = remove_temporaries(plan.root)
    if removed:
        log.warning("removed %d temporary files left by an interrupted run", removed)
    write_json_atomic(
        job_file,
        {
            "fingerprint": plan.fingerprint,
            "settings": plan.settings,
            "config": dataclasses.asdict(plan.config),
            "inputs": [s.source for s in plan.shards],
            "command": sys.argv,
        },
    )


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


@contextmanager
def output_lock(root: Path) -> Iterator[None]:
    """Holds an exclusive lock on the output directory for the duration of the job."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another precompute job is writing to {root}") from None
        yield


# ---------------------------------------------------------------------------------------
# Running: Ray actors, scheduling, retries


def connect(address: str | None) -> bool:
    """Joins the given cluster (or RAY_ADDRESS's); else starts an embedded one. True if we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **quiet)
        print(f"joined the Ray cluster at {address}", file=sys.stderr)
        return False
    ray.init(address="local", include_dashboard=False, **quiet)
    print("started an embedded Ray cluster (give --address or RAY_ADDRESS to join one)", file=sys.stderr)
    return True


class EncoderPool:
    """The encoder actors, each holding one VAE (on one GPU when the cluster has GPUs).

    An actor that dies is not reused: it is killed and replaced by a fresh one, which loads
    the model again. Replacements are bounded, so a node that kills every actor (a broken GPU,
    a model that cannot load) ends the job instead of looping.
    """

    def __init__(self, plan: Plan, count: int, gpus: float) -> None:
        run = plan.config.run
        options: dict[str, Any] = {"num_cpus": run.cpus_per_worker, "max_restarts": 0, "max_concurrency": 1}
        if gpus:
            options["num_gpus"] = 1
        self._remote = ray.remote(ShardEncoder).options(**options)
        self._args = (plan.config, str(plan.root), plan.constants)
        self.replacements_left = count * run.max_attempts
        self.actors = [self._remote.remote(*self._args) for _ in range(count)]
        devices = ray.get([a.ready.remote() for a in self.actors])
        log.info("%d encoder actors ready on %s", count, ", ".join(sorted(set(devices))))

    def replace(self, actor: Any) -> Any | None:
        """Kills a failed actor and returns a new one (None once replacements are used up)."""
        ray.kill(actor, no_restart=True)
        self.actors.remove(actor)
        if self.replacements_left <= 0:
            return None
        self.replacements_left -= 1
        fresh = self._remote.remote(*self._args)
        self.actors.append(fresh)
        return fresh

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def worker_count(plan: Plan, resources: dict[str, float], pending: int) -> int:
    gpus = int(resources.get("GPU", 0))
    if plan.config.run.workers:
        n = plan.config.run.workers
    elif gpus:
        n = gpus
    else:
        n = max(1, int(resources.get("CPU", 1)) // plan.config.run.cpus_per_worker)
    return max(1, min(n, pending))


def schedule(plan: Plan, shards: list[Shard], pool: EncoderPool, bar: ProgressBar, summary: Summary) -> None:
    """Runs every shard on the actor pool; retries a shard whose worker failed."""
    queue = deque(shards)
    attempts: Counter[str] = Counter()
    counted: Counter[str] = Counter()  # samples reported so far by a shard's current attempt
    frames: Counter[str] = Counter()
    idle = list(pool.actors)
    running: dict[Any, tuple[Any, Shard]] = {}
    while running or (queue and idle):
        while idle and queue:
            actor, shard = idle.pop(), queue.popleft()
            attempts[shard.name] += 1
            running[actor.encode_shard.options(num_returns="streaming").remote(shard)] = (actor, shard)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for gen in ready:
            actor, shard = running[gen]
            try:
                message = ray.get(next(gen))
            except StopIteration:
                del running[gen]
                idle.append(actor)
                continue
            except (ray.exceptions.RayError, OSError) as e:
                del running[gen]
                if isinstance(e, ray.exceptions.RayActorError):
                    actor = pool.replace(actor)  # the process died: the next attempt gets a fresh one
                if actor is not None:
                    idle.append(actor)
                bar.update(samples=-counted.pop(shard.name, 0), frames=-frames.pop(shard.name, 0))
                reason = _first_line(e)
                if attempts[shard.name] < plan.config.run.max_attempts:
                    log.warning("shard %s failed (attempt %d): %s; retrying", shard.name, attempts[shard.name], reason)
                    queue.append(shard)
                else:
                    summary.failed[shard.name] = f"{attempts[shard.name]} attempts, last: {reason}"
                continue
            if isinstance(message, Progress):
                counted[shard.name] += message.samples
                frames[shard.name] += message.frames
                bar.update(samples=message.samples, frames=message.frames)
            elif isinstance(message, ShardDone):
                counted.pop(shard.name, None)
                frames.pop(shard.name, None)
                marker = message.marker
                summary.ok += marker["ok"]
                summary.errors += marker["errors"]
                summary.frames += marker["frames"]
                summary.shards_written += 1
                summary.error_reasons += message.error_reasons
                bar.update(shards=1)
        bar.update()
    for shard in queue:  # only when every actor died and none could replace it
        summary.failed[shard.name] = "no encoder actor left (each one died; see the Ray logs)"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # Ray wraps the remote traceback; its last line is the exception itself.
    return (lines[-1] if lines else type(e).__name__)[:300]


def run(config: JobConfig) -> Summary:
    """Runs (or resumes) a precompute job and returns its summary.

    Raises:
        UsageError, ValueError, CheckpointError, FileNotFoundError: Unusable settings.
    """
    started = time.monotonic()
    shards = check_config(config)
    owns_ray = connect(config.run.address)
    try:
        resources = ray.cluster_resources()
        plan = make_plan(config, shards, has_gpus=resources.get("GPU", 0) > 0)
        with output_lock(plan.root):
            prepare_output(plan)
            summary = Summary(output=str(plan.root), fingerprint=plan.fingerprint)
            pending = [s for s in shards if _committed(plan, s) is None]
            summary.shards_skipped = len(shards) - len(pending)
            if pending:
                total = _count(pending)
                n = worker_count(plan, resources, len(pending))
                print(
                    f"{len(pending)} shards to encode ({summary.shards_skipped} already committed), "
                    f"{total} samples, {n} workers, VAE {plan.config.vae.name} ({plan.config.vae.dtype})",
                    file=sys.stderr,
                )
                pool = EncoderPool(plan, n, resources.get("GPU", 0))
                bar = ProgressBar(total, len(pending))
                try:
                    schedule(plan, pending, pool, bar, summary)
                finally:
                    bar.close()
                    pool.shutdown()
            remove_temporaries(plan.root)
            if summary.complete:
                write_manifest(plan)
    finally:
        if owns_ray:
            ray.shutdown()
    summary.seconds = time.monotonic() - started
    return summary


def _committed(plan: Plan, shard: Shard) -> dict[str, Any] | None:
    marker = read_commit(plan.root, shard.name)
    if marker is None or marker.get("fingerprint") != plan.fingerprint or marker.get("source") != shard.source:
        return None
    return marker


def _count(shards: list[Shard]) -> int:
    """Samples in the shards, from tar headers (local shards only; others count as one each)."""
    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(lambda s: count_samples(s.source) if s.is_local else 1, shards))


def write_manifest(plan: Plan) -> None:
    markers = [_committed(plan, s) for s in plan.shards]
    shards = [
        {k: m[k] for k in ("name", "source", "samples", "ok", "errors", "frames", "latents", "meta")}
        for m in markers
        if m is not None
    ]
    write_json_atomic(
        plan.root / MANIFEST_FILE,
        {
            "fingerprint": plan.fingerprint,
            "shards": shards,
            "samples": sum(s["samples"] for s in shards),
            "ok": sum(s["ok"] for s in shards),
            "errors": sum(s["errors"] for s in shards),
            "frames": sum(s["frames"] for s in shards),
        },
    )


# ---------------------------------------------------------------------------------------
# Command line


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
            (p.name, p.family, f"{tc}x{sc}x{sc}", p.frame_rule, f"x{p.size_multiple}", str(p.latent_channels))
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
        config = config_from_args(args)
        summary = run(config)
    except (UsageError, ValueError, CheckpointError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: committed shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(summary.text())
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
