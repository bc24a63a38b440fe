"""The job's one typed config: nested dataclasses, strict about unknown keys and choices.

A config comes from a YAML or JSON file (`--config`), then command-line overrides
(`--set video.num_frames=33` and the few named flags of `jobs.precompute`). Loading checks
keys and types; every choice is a `Literal` type, whose values `JobConfig.validate` checks in
one place, together with the ranges. The resolved config is written to
`DIR/job.json` and fingerprinted (`jobs.orchestration.settings`), so a rerun with other
settings is refused instead of mixing old and new files.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jobs.inputs.buckets import bucket_table
from jobs.inputs.decode_pool import DecodePriority
from jobs.inputs.sampling import ClipPolicy, ResizeMode
from vae import TilingConfig, describe_error
from vae.spec import NormStats, TilingMode

Dtype = Literal["float32", "bfloat16", "float16"]


class UsageError(ValueError):
    """Arguments or settings that no run could use: exit status 2, with a one-line message."""


class RunFailed(RuntimeError):
    """The run cannot go on, for a reason one line says (no encoder actor could start): exit status 1."""


class Terminated(KeyboardInterrupt):
    """The driver got SIGTERM (a preemption, `ray job stop`): it stops as on Ctrl-C, exit status 143."""


@dataclass
class TilingSection:
    # auto: untiled when the clip fits the memory budget, else exact temporal chunks, else tiles;
    # opensora: Open-Sora's training-time tiles (to reproduce its trainer's latents exactly); off
    mode: TilingMode = "auto"
    memory_budget_gb: float | None = None  # per encoder call; None = 90% of free GPU memory (CPU: unbounded)
    causal_norm: NormStats = "causal"  # GroupNorm statistics of causal-VAE chunks (see vae/causal_3d_stream.py)


@dataclass
class VAEConfig:
    name: str = "flux-ae-tiny"  # a preset from `python -m jobs.precompute --list-vaes`
    checkpoint: str | None = None  # safetensors file; None = random weights (tests, dry runs)
    dtype: Literal["auto"] | Dtype = "auto"  # compute dtype; auto = bfloat16 on GPU, float32 on CPU
    sample: bool = True  # store a posterior sample (Open-Sora's default) instead of the mode
    seed: int = 0  # per-sample posterior noise is seeded from (seed, key): reruns are identical
    tiling: TilingSection = field(default_factory=TilingSection)


@dataclass
class VideoConfig:
    num_frames: int = 17  # frames of each clip (without buckets)
    height: int = 256  # size of each clip (without buckets): resize to cover, then centre crop
    width: int = 256
    adapt: bool = False  # fit num_frames/height/width down to what the VAE accepts, instead of refusing
    # exact: Open-Sora's float resize (the trainer's pixels); decoder: FFmpeg's scaler in uint8 first
    # (memory bounded by the clip instead of the source frame; slightly other pixels)
    resize: ResizeMode = "exact"
    # Frame sampling (jobs/inputs/sampling.py): keep every ceil(fps / fps_max)-th frame (None: every frame)
    fps_max: float | None = None
    # Where clips start: first, middle, random (seeded by vae.seed and the key), or several per
    # video: uniform (evenly spaced, none overlapping) or every (one each clip_every_s seconds)
    clips: ClipPolicy = "first"
    max_clips: int = 8  # most clips per video (uniform, every)
    clip_every_s: float = 10.0
    # Open-Sora's buckets, {resolution: {num_frames: [probability, batch_size]}}, e.g.
    # {"256px": {17: [1.0, 4], 1: [1.0, 16]}}; None: every clip is num_frames x height x width
    buckets: dict[str, dict[int, Any]] | None = None
    bucket_multiple: int = 0  # bucket sizes are multiples of this; 0 = max(16, the VAE's size multiple)
    # tar member suffixes taken as the video (or image) of a sample, in order of preference
    extensions: list[str] = field(
        default_factory=lambda: ["mp4", "avi", "mkv", "mov", "webm", "m4v", "jpg", "jpeg", "png", "webp"]
    )


@dataclass
class LatentConfig:
    dtype: Dtype = "float32"  # storage dtype of the latents (bfloat16 halves the size)
    store_posterior: bool = False  # also store the unscaled posterior `mean` and `logvar`


@dataclass
class LimitsConfig:
    """What one sample may cost. A sample over a limit is an error row naming it; the limits decide
    which samples are refused, never the bytes of a latent, so they are not in the fingerprint."""

    max_member_bytes: int = 2 * 2**30  # a tar member (or a sample's members together) over this is not read (2 GiB)
    max_pixels: int = 8192 * 8192  # frames with more pixels (W * H) are refused before decoding
    max_frames: int = 1_000_000  # frames a sample may hold (and decode for one clip)
    decode_timeout_s: float = 300.0  # decoding one sample may take this long
    window_bytes: int = 2 * 2**30  # input bytes and clips an actor holds while decoding ahead of the model


@dataclass
class RunConfig:
    address: str | None = None  # Ray cluster to join; None = RAY_ADDRESS, else an embedded one
    workers: int = 0  # encoder actors; 0 = one per GPU (or per `cpus_per_worker` CPUs)
    # GPUs to ask the cluster's autoscaler for (GPU nodes are started for them); the job waits up to
    # `actor_start_timeout` for the first, and takes the others as they join. 0: the GPUs present.
    gpus: int = 0
    cpus_per_worker: int = 1  # CPU threads of each actor (decode + CPU encode)
    batch_size: int = 4  # clips per encoder call
    decode_threads: int = 2  # decoding processes per actor, overlapping with encoding
    # The decoding processes' CPU priority against the model's: "idle" (Linux's SCHED_IDLE: they run
    # only on a CPU the model leaves, and give it back the moment the model wants it), "low" (nice
    # 19), "normal" (the model's); auto: "idle" where the model runs on the CPU, so that the
    # decoders do not stall its threads, and "normal" beside a GPU. A decode's time limit leaves
    # out the time its process waits for a CPU. The output is the same either way.
    decode_priority: Literal["auto"] | DecodePriority = "auto"
    # Each actor is handed its next shard with the one it encodes, and starts decoding the next
    # one's first samples while it finishes and commits this one (the model does not wait for
    # them at the shard's start); the output is the same either way
    read_ahead: bool = True
    # Convolutions in channels-last layout: faster on most hardware (benchmarks/encoder.py); the
    # latents' last bits change (about 1e-6), so it is part of the fingerprint
    channels_last: bool = False
    # On a GPU, batches are stacked into page-locked host memory, so that their copy to the GPU is
    # a DMA that needs no staging copy of its own (the bytes are the same either way)
    pin_memory: bool = True
    # A batch's latents are written while the next batch encodes: the model is given batch k+1
    # before batch k's rows are written, so that on a GPU the host's work (writing, waiting for and
    # stacking clips) runs while the device encodes; with `pin_memory`, the latents come back to
    # page-locked memory without the host waiting for them. The same output.
    write_behind: bool = True
    # Clips whose pixels are whole numbers (`video.resize: decoder`, or frames that need no resize)
    # leave the decoding processes as uint8 and become [-1, 1] floats on the encoder's device: a
    # quarter of the bytes through shared memory, host RAM and the copy to the GPU (the same bits)
    uint8_frames: bool = True
    # The actor's C allocator keeps freed host memory (up to 512 MiB) for the next batch instead of
    # handing it back to the kernel and faulting it in again, zeroed, page by page: on CPU the model
    # runs 1.25x faster (jobs/orchestration/host_memory.py); glibc only, the same bytes
    reuse_host_memory: bool = True
    # `torch.compile` of the VAE's encoder: faster after a compile per input shape (a bucket's batch);
    # the latents' last bits move, so it is part of the fingerprint
    compile: bool = False
    # A shard committed from another input under the same name (the output name is the shard's path
    # after its SPEC's fixed folder) is refused, since other data would replace it; true: the inputs
    # only moved (another mount, a copy in an object store), and what is committed stands
    inputs_moved: bool = False
    max_attempts: int = 3  # tries per shard when a worker dies or raises
    actor_start_timeout: float = 600.0  # seconds an encoder actor may take to be placed and load its VAE
    scale_interval_s: float = 30.0  # with workers 0: how often the pool looks for new nodes to start actors on
    # The error budget: the job stops (exit 1, committed shards kept) once more than this fraction of
    # its samples are error rows, counted after `error_rate_after` samples. 1.0 never stops.
    max_error_rate: float = 0.5
    error_rate_after: int = 100
    # Seconds between the driver's progress lines where stderr is no terminal (`ray job logs -f`,
    # a file); a terminal's line is redrawn in place. Not fingerprinted: it changes no output byte.
    progress_interval_s: float = 10.0


@dataclass
class JobConfig:
    input: list[str] = field(default_factory=list)  # shard paths, globs or brace patterns
    output: str = ""
    vae: VAEConfig = field(default_factory=VAEConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    latents: LatentConfig = field(default_factory=LatentConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        """Raises UsageError for settings no run could use: the one check of every choice and range."""
        for path, value, choices in _choice_fields(self):
            if value not in choices:
                raise UsageError(f"{path} must be one of {', '.join(map(str, choices))}; got {value!r}")
        if not self.input:
            raise UsageError("no input given (--input SPEC)")
        if not self.output:
            raise UsageError("no output directory given (--output DIR)")
        # Any scheme-like start ("s3:/bucket", "gs://...") that is not an s3:// prefix: a typo or a
        # store the job cannot write would otherwise become a local folder named "s3:".
        if re.match(r"^[a-z][a-z0-9+.-]*:", self.output, re.IGNORECASE) and not self.output.startswith("s3://"):
            raise UsageError(
                f"cannot write to '{self.output}': the output is a local or mounted directory or an s3:// prefix "
                "(gs:// and http(s):// can be read as inputs, not written; a local folder whose name has a "
                "colon: ./NAME)"
            )
        for name, value in [
            ("video.num_frames", self.video.num_frames),
            ("video.height", self.video.height),
            ("video.width", self.video.width),
            ("run.batch_size", self.run.batch_size),
            ("run.decode_threads", self.run.decode_threads),
            ("run.max_attempts", self.run.max_attempts),
            ("run.cpus_per_worker", self.run.cpus_per_worker),
            ("video.max_clips", self.video.max_clips),
        ]:
            if value < 1:
                raise UsageError(f"{name} must be at least 1; got {value}")
        if self.run.workers < 0:
            raise UsageError(f"run.workers must be 0 (auto) or more; got {self.run.workers}")
        if self.run.gpus < 0:
            raise UsageError(f"run.gpus must be 0 (the GPUs present) or more; got {self.run.gpus}")
        for name in ("max_member_bytes", "max_pixels", "max_frames", "decode_timeout_s", "window_bytes"):
            if getattr(self.limits, name) <= 0:
                raise UsageError(f"limits.{name} must be positive; got {getattr(self.limits, name)}")
        if not 0 <= self.run.max_error_rate <= 1:
            raise UsageError(f"run.max_error_rate must be in [0, 1]; got {self.run.max_error_rate}")
        if self.run.error_rate_after < 1:
            raise UsageError(f"run.error_rate_after must be at least 1; got {self.run.error_rate_after}")
        if self.run.scale_interval_s <= 0:
            raise UsageError(f"run.scale_interval_s must be positive seconds; got {self.run.scale_interval_s}")
        if self.run.progress_interval_s <= 0:
            raise UsageError(f"run.progress_interval_s must be positive seconds; got {self.run.progress_interval_s}")
        if self.run.actor_start_timeout <= 0:
            raise UsageError(f"run.actor_start_timeout must be positive seconds; got {self.run.actor_start_timeout}")
        if not 0 <= self.vae.seed < 2**63:  # torch seeds its generators with a 64-bit integer
            raise UsageError(f"vae.seed must be in [0, 2**63); got {self.vae.seed}")
        t = self.vae.tiling
        if t.memory_budget_gb is not None and t.memory_budget_gb <= 0:
            raise UsageError(f"vae.tiling.memory_budget_gb must be positive; got {t.memory_budget_gb}")
        try:
            self.tiling()
        except ValueError as e:
            raise UsageError(f"vae.tiling: {e}") from None
        v = self.video
        if v.fps_max is not None and v.fps_max <= 0:
            raise UsageError(f"video.fps_max must be positive (or null); got {v.fps_max}")
        if v.clip_every_s <= 0:
            raise UsageError(f"video.clip_every_s must be positive; got {v.clip_every_s}")
        if v.bucket_multiple < 0:
            raise UsageError(f"video.bucket_multiple must be 0 (auto) or positive; got {v.bucket_multiple}")
        if v.buckets is not None:
            try:
                bucket_table(v.buckets, 16)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if not self.video.extensions:
            raise UsageError("video.extensions is empty")
        # webdataset lower-cases member suffixes, so the extensions are compared lower-cased.
        self.video.extensions = [e.lower().lstrip(".") for e in self.video.extensions]

    def tiling(self) -> TilingConfig:
        """The `vae.TilingConfig` of this job's `vae.tiling` section."""
        t = self.vae.tiling
        budget = None if t.memory_budget_gb is None else int(t.memory_budget_gb * 2**30)
        return TilingConfig(mode=t.mode, memory_budget=budget, norm=t.causal_norm)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Reads a YAML/JSON config file (all keys optional) and applies `a.b=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
            loaded = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise UsageError(f"cannot read config {path}: {describe_error(e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"{path}: expected a mapping at the top level")
        data = loaded or {}
    config = from_dict(JobConfig, data)
    for item in overrides or []:
        apply_override(config, item)
    return config


# Keys that an earlier version had and this one renamed: a config that sets one is told the new
# name, and a recorded config (`job.json`, which `jobs.reconstruct` reads) drops it (none is
# fingerprinted).
RETIRED = {"run.decode_nice": "run.decode_priority"}


def without_retired(data: dict[str, Any]) -> dict[str, Any]:
    """A recorded config's dict without the `RETIRED` keys it may hold."""
    out = dict(data)
    for path in RETIRED:
        section, key = path.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Builds dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UsageError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names and path in RETIRED:
            raise UsageError(f"config key '{path}' is now '{RETIRED[path]}'")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise UsageError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    choices = _choices(tp)
    if choices is not None:  # a choice: its type here, its value in `JobConfig.validate`
        if isinstance(value, bool) and {"off", "on"} & set(choices):
            return "on" if value else "off"  # YAML 1.1 reads a bare `off` (or `on`) as a boolean
        return _coerce(type(choices[0]), value, path)
    if tp is Any:  # checked where it is used (the bucket config's entries)
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = args
        out = {}
        for k, v in value.items():
            if key_type is int and isinstance(k, str) and k.strip().isdigit():
                k = int(k)  # JSON (and --set) keys are strings
            out[_coerce(key_type, k, f"{path}.{k}")] = _coerce(value_type, v, f"{path}.{k}")
        return out
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if origin is list:
        if isinstance(value, str):  # a single path or pattern where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise UsageError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            return float(value)  # YAML 1.1 reads `1e-9` (no dot) as a string
        raise UsageError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"{path}: unsupported config type {tp}")


def apply_override(config: JobConfig, item: str) -> None:
    """Applies one `section.key=value` override; the value is parsed as YAML (`17`, `true`, `[a, b]`)."""
    dotted, sep, raw = item.partition("=")
    if not sep or not dotted:
        raise UsageError(f"override '{item}' is not of the form key=value (e.g. video.num_frames=33)")
    *parents, leaf = dotted.strip().split(".")
    target: Any = config
    for i, part in enumerate(parents):
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise UsageError(f"unknown config key '{'.'.join(parents[: i + 1])}' in override '{item}'")
        target = getattr(target, part)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UsageError(f"override '{item}': the value is not YAML ({describe_error(e)})") from None
    patch = from_dict(type(target), {leaf: value}, ".".join(parents))
    setattr(target, leaf, getattr(patch, leaf))


def _choices(tp: Any) -> tuple[Any, ...] | None:
    """The values a `Literal` type (or a union of them, `Literal["auto"] | Dtype`) allows; None for other types."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_choices(a) for a in typing.get_args(tp)]
        if all(p is not None for p in parts):
            return tuple(c for p in parts if p is not None for c in p)
    return None


def _choice_fields(config: Any, where: str = "") -> list[tuple[str, Any, tuple[Any, ...]]]:
    """`(dotted path, value, allowed values)` of every choice field in a config tree."""
    found = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        path, value = f"{where}{f.name}", getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found += _choice_fields(value, f"{path}.")
        elif (choices := _choices(hints[f.name])) is not None:
            found.append((path, value, choices))
    return found
