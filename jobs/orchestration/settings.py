"""From a config to a plan: checks that need no cluster, then the settings, fingerprint and constants.

The settings are everything that determines the output bytes (the VAE and its weights' sha256,
dtypes, sampling, tiling, frames and size, the device kind, batch size and CPU threads, the format
version); their fingerprint goes into
`job.json`, every commit marker and every Parquet row, so a rerun with other settings is refused
instead of mixing latents. This module is the one that knows the settings' layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from jobs.dataset.layout import FORMAT_VERSION
from jobs.dataset.store import open_store
from jobs.inputs.buckets import bucket_table
from jobs.inputs.sampling import ClipRequest
from jobs.inputs.shards import Shard, list_shards
from jobs.orchestration.config import JobConfig, UsageError
from vae import (
    CheckpointError,
    VAEPreset,
    check_checkpoint,
    get_preset,
    resolve_name,
    weights_path,
    weights_sha256,
)


@dataclass
class Plan:
    config: JobConfig  # with vae.dtype and paths resolved
    root: str  # the output: a resolved local path or an s3:// URL (`jobs.dataset.store.open_store` opens it)
    shards: list[Shard]
    settings: dict[str, Any]  # everything that determines the output bytes
    fingerprint: str
    constants: dict[str, Any]  # columns shared by all rows
    allow_shell: bool = False  # the user's opt-in to `pipe:` sources (a policy of the run, not a setting)


def usable_preset(name: str) -> VAEPreset:
    """The preset of `name`, or a UsageError saying why it cannot be had (CheckpointError as it is)."""
    try:
        return get_preset(name)
    except CheckpointError:
        raise
    except (KeyError, ImportError, FileNotFoundError, ValueError) as e:  # ImportError: diffusers not installed
        raise UsageError(e.args[0] if e.args else str(e)) from None


def check_config(config: JobConfig, allow_shell: bool = False) -> list[Shard]:
    """Validates the settings that need no cluster, resolving paths in place; returns the input shards.

    `allow_shell` lets `pipe:` SPECs run their commands (the user's opt-in on the command line).

    Raises:
        UsageError: Unusable settings, VAE, shapes or inputs.
        CheckpointError: A checkpoint that does not fit the VAE.
    """
    config.validate()
    config.vae.name = resolve_name(config.vae.name)  # a diffusers folder's path made absolute for the workers
    preset = usable_preset(config.vae.name)
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
    if v.buckets is None:
        try:
            preset.check_input(v.num_frames, v.height, v.width)
        except ValueError as e:
            raise UsageError(f"{e}; or --set video.adapt=true to fit them") from None
    else:
        clip_request(config, preset)  # the buckets' frame counts and sizes, checked against the VAE
    if config.vae.checkpoint is not None:
        config.vae.checkpoint = os.path.abspath(config.vae.checkpoint)
    try:
        check_checkpoint(preset, config.vae.checkpoint)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    try:
        return list_shards(config.input, allow_shell)
    except ValueError as e:
        raise UsageError(str(e)) from None


def bucket_multiple(config: JobConfig, preset: VAEPreset) -> int:
    """The multiple of bucket sizes: `video.bucket_multiple`, or Open-Sora's 16 (its AE's 8 times its
    patch size 2) raised to the VAE's own size multiple."""
    return config.video.bucket_multiple or max(16, preset.size_multiple)


def clip_request(config: JobConfig, preset: VAEPreset) -> ClipRequest:
    """What the job cuts out of every sample, for `preset`.

    Raises:
        UsageError: A bucket that the VAE cannot encode (frame count, size multiple).
    """
    v = config.video
    table = None
    if v.buckets is not None:
        multiple = bucket_multiple(config, preset)
        if multiple % preset.size_multiple:
            raise UsageError(
                f"video.bucket_multiple = {multiple} is not a multiple of VAE '{preset.name}''s size multiple "
                f"{preset.size_multiple}"
            )
        try:
            table = bucket_table(v.buckets, multiple)
        except ValueError as e:
            raise UsageError(str(e)) from None
        bad = sorted(t for t in table.frame_counts() if not preset.frames_ok(t))
        if bad:
            raise UsageError(
                f"video.buckets: frame counts {bad} do not suit VAE '{preset.name}' (frames {preset.frame_rule})"
            )
    return ClipRequest(
        num_frames=v.num_frames,
        height=v.height,
        width=v.width,
        fps_max=v.fps_max,
        policy=v.clips,
        max_clips=v.max_clips,
        every_s=v.clip_every_s,
        seed=config.vae.seed,
        buckets=table,
        resize=v.resize,
    )


def make_plan(config: JobConfig, shards: list[Shard], has_gpus: bool, allow_shell: bool = False) -> Plan:
    """The plan of a checked config: `vae.dtype` resolved for the cluster, settings and fingerprint."""
    config = dataclasses.replace(config, vae=dataclasses.replace(config.vae))
    if config.vae.dtype == "auto":
        config.vae.dtype = "bfloat16" if has_gpus else "float32"
    preset = get_preset(config.vae.name)
    path = weights_path(preset, config.vae.checkpoint)  # a diffusers folder is its own checkpoint
    sha = weights_sha256(preset, config.vae.checkpoint, config.vae.seed)
    settings = {
        "format_version": FORMAT_VERSION,
        "vae": vae_settings(preset, sha, config.vae.dtype),
        "sampling": {"sample": config.vae.sample, "seed": config.vae.seed},
        "tiling": dataclasses.asdict(config.vae.tiling),
        "video": dataclasses.asdict(config.video),
        "latents": dataclasses.asdict(config.latents),
        # How the numbers are computed changes their last bits (about 1e-6): the device kind, the clips
        # per encoder call, the weights' layout, compiled kernels and, on CPU, the threads of each
        # actor. (So may another GPU model or another PyTorch; those are not pinned, or no cluster
        # could mix them.)
        "compute": {
            "device": "cuda" if has_gpus else "cpu",
            "batch_size": config.run.batch_size,
            "cpu_threads": None if has_gpus else config.run.cpus_per_worker,
            "channels_last": config.run.channels_last,
            "compile": config.run.compile,
        },
    }
    settings = json.loads(json.dumps(settings))  # as job.json will hold it (tuples -> lists)
    fp = fingerprint(settings)
    constants = {
        "fingerprint": fp,
        "vae": preset.name,
        "vae_checkpoint": os.path.basename(path) if path else "",
        "vae_checkpoint_sha256": sha,
        "vae_dtype": config.vae.dtype,
        "scale_factor": preset.scale_factor,
        "shift_factor": preset.shift_factor,
        "scaling": preset.scaling,
    }
    return Plan(config, open_store(config.output).url, shards, settings, fp, constants, allow_shell)


def fingerprint(settings: dict[str, Any]) -> str:
    """Short stable hash of the settings that determine the output bytes."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def vae_settings(preset: VAEPreset, sha256: str, dtype: str) -> dict[str, Any]:
    """The `vae` section of the settings: the preset's description, its weights' identity, the compute dtype."""
    return {**preset.describe(), "checkpoint_sha256": sha256, "dtype": dtype}


@dataclass(frozen=True)
class RecordedVAE:
    """The VAE a job's settings recorded, as a later reader (reconstruct, validate) needs it."""

    settings: dict[str, Any]

    @property
    def sha256(self) -> str:
        return self.settings["checkpoint_sha256"]

    @property
    def dtype(self) -> str:
        return self.settings["dtype"]

    def changes(self, preset: VAEPreset) -> list[str]:
        """The recorded entries that `preset` (as this code builds it now) no longer matches."""
        current = json.loads(json.dumps(vae_settings(preset, self.sha256, self.dtype)))
        return sorted(k for k in current if current[k] != self.settings.get(k))


def recorded_vae(settings: dict[str, Any]) -> RecordedVAE:
    return RecordedVAE(settings["vae"])


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every setting that differs, dotted paths for nested ones."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
