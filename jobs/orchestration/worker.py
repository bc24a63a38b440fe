"""The encoder: turns one input shard into one committed latent shard.

`ShardEncoder` is a plain class (Ray runs it inside `EncoderActor`, jobs/orchestration/actor.py,
one actor per GPU). It loads the VAE once, then for each shard streams samples out of the tar,
decodes videos in a few processes while the model encodes, and writes each batch's latents and
metadata through `ShardWriter` while the next batch encodes. A sample that fails anywhere becomes
an error row; only a failure of the worker itself (a crash, a full disk) fails the shard, which
the driver then retries.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs.dataset.writer import ShardWriter
from jobs.inputs.decode_pool import ClipSpec, DecodePool, DecodeUnavailable
from jobs.inputs.shards import Shard
from jobs.inputs.tar_samples import RawSample, read_shard, split_sample
from jobs.inputs.video import Clip, DecodeLimits, VideoError, signed_unit
from jobs.orchestration.config import JobConfig
from jobs.orchestration.host_memory import reuse_freed_memory
from jobs.orchestration.settings import clip_request
from vae import (
    channels_last,
    channels_last_input,
    compile_encoder,
    describe_error,
    encode_video,
    get_preset,
    load_vae,
    plan_encode,
)

log = logging.getLogger(__name__)

DECODE_GRACE_S = 5.0  # a hung decode is killed this long after `limits.decode_timeout_s`


@dataclass
class Progress:
    """Samples finished since the last report (sent while a shard is being encoded)."""

    samples: int
    frames: int
    errors: int = 0  # of those samples, error rows (and rows of damage in the shard)


@dataclass
class ShardDone:
    """The shard is committed: its marker, and the reasons of its error rows."""

    marker: dict[str, Any]
    error_reasons: list[str] = field(default_factory=list)  # "key: reason"
    reason_kinds: Counter[str] = field(default_factory=Counter)  # reasons with their numbers elided
    read_ahead: int = 0  # samples handed to the decoding processes before the shard's call began
    decode_wait_s: float = 0.0  # seconds the model waited for decoding (the window's oldest sample)
    model_s: float = 0.0  # seconds in the model: batches to the device, encoded, latents back on the host


def reason_kind(reason: str) -> str:
    """An error reason with its numbers elided, so that alike errors count together."""
    return re.sub(r"\d+(\.\d+)?", "N", reason)[:100]


@dataclass
class _Pending:
    """A sample in the decode window: split here, its clip decoding in a child process."""

    raw: RawSample
    fields: dict[str, Any]
    clip: Future[list[Clip]] | None = None  # None: `error` says why there are no clips to wait for
    error: str | None = None
    nbytes: int = 0  # what it holds while it waits

    def done(self) -> bool:
        return self.clip is None or self.clip.done()


@dataclass
class _Reading:
    """A shard being read: its samples not yet read, and the decode window of those read."""

    shard: Shard
    samples: Iterator[RawSample]
    damage: list[str] = field(default_factory=list)  # damage inside the tar (`read_shard`'s on_damage)
    window: deque[_Pending] = field(default_factory=deque)  # samples being decoded, oldest first
    seen: dict[str, int] = field(default_factory=dict)  # key -> index, to find duplicates
    held: int = 0  # bytes the window holds: the input members, and the clips they decode to
    failed: Exception | None = None  # reading the tar raised while it was read ahead (the shard's attempt fails)
    read_ahead: int = 0  # samples read ahead, before the shard's own call

    def discard(self) -> None:
        """Drops what was read ahead: decodes not started are cancelled, the tar is closed."""
        for pending in self.window:
            if pending.clip is not None:
                pending.clip.cancel()
        self.window.clear()
        close = getattr(self.samples, "close", None)
        if close is not None:
            close()


@dataclass
class _Decoded:
    raw: RawSample
    fields: dict[str, Any]
    clip: Clip | None = None
    error: str | None = None


@dataclass
class _Launched:
    """A batch given to the model: its results (latents on the host, or the exception of an item)
    and, on a GPU, the event after which their copies to the host are complete."""

    items: list[_Decoded]
    results: list[dict[str, torch.Tensor] | Exception]
    ready: torch.cuda.Event | None = None  # None: the results are complete already


def sample_seed(seed: int, key: str, clip: int = 0) -> int:
    """Seed of a clip's posterior noise: depends on the job seed, the key and the clip number only."""
    name = key if clip == 0 else f"{key}#{clip}"
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def device_for_worker() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU, so it is always cuda:0 here.
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


class ShardEncoder:
    """Holds one VAE and encodes whole shards with it.

    Args:
        config: The resolved job config (`vae.dtype` already resolved from "auto").
        root: Output directory.
        constants: Column values shared by all rows (fingerprint, VAE identity).
        allow_shell: Whether `pipe:` sources may run their commands (the user opted in).
        first: The shard this encoder will be given first (`run.read_ahead`): its first samples
            are read and handed to the decoding processes before the model loads, so that they
            decode while it loads.
    """

    def __init__(
        self,
        config: JobConfig,
        root: str,
        constants: dict[str, Any],
        allow_shell: bool = False,
        first: Shard | None = None,
    ) -> None:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        self.config = config
        self.root = root
        self.constants = constants
        self.allow_shell = allow_shell
        if config.run.reuse_host_memory:
            reuse_freed_memory()  # before the model's first allocations
        self.device = device_for_worker()
        if self.device.type == "cpu":
            torch.set_num_threads(config.run.cpus_per_worker)
        self.dtype = getattr(torch, config.vae.dtype)
        self.latent_dtype = getattr(torch, config.latents.dtype)
        # Decoding runs in child processes: one that hangs is killed a little after the decoder's
        # own timeout would have fired, and the worker goes on.
        priority = config.run.decode_priority
        if priority == "auto":  # beside a model on the same cores, the decoders take the cycles it leaves
            priority = "idle" if self.device.type == "cpu" else "normal"
        timeout = config.limits.decode_timeout_s + DECODE_GRACE_S
        self.decoder = DecodePool(config.run.decode_threads, timeout=timeout, priority=priority)
        self.preset = get_preset(config.vae.name)  # resolved once (a diffusers folder reads its config.json)
        limits = config.limits
        self.request = clip_request(config, self.preset)
        self.clip_spec = ClipSpec(
            self.request,
            DecodeLimits(
                max_pixels=limits.max_pixels,
                max_frames=limits.max_frames,
                timeout=limits.decode_timeout_s,  # the decoder's own check, after every frame
                threads=max(1, config.run.cpus_per_worker // config.run.decode_threads),  # the actor's CPUs, shared
            ),
            uint8=config.run.uint8_frames,
        )
        # The most a sample's clips may hold (the decode window's byte budget counts it).
        sizes = (
            [(b.num_frames, b.height, b.width) for b in self.request.buckets.buckets()] if self.request.buckets else []
        )
        t, h, w = max(
            sizes,
            key=lambda s: s[0] * s[1] * s[2],
            default=(config.video.num_frames, config.video.height, config.video.width),
        )
        self.clip_bytes = 3 * t * h * w * 4 * (self.request.max_clips if self.request.multi_clip else 1)
        self._launched: _Launched | None = None  # the batch whose latents are written at the next flush
        self._ahead: _Reading | None = None  # the shard read ahead (`then` of the last `encode_shard`)
        self._waited = 0.0  # seconds spent waiting for decodes during the current shard
        self._in_model = 0.0  # seconds spent in the model during the current shard
        if first is not None and config.run.read_ahead:
            self._read_ahead(first, limits.window_bytes)
        self.model = load_vae(
            self.preset, config.vae.checkpoint, device=self.device, dtype=self.dtype, seed=config.vae.seed
        )
        if config.run.channels_last:
            channels_last(self.model)
        if config.run.compile:
            compile_encoder(self.model)
        self.tiling = config.tiling()

    def ready(self) -> str:
        """Returns the device in use (lets the driver wait for the model to be loaded)."""
        return str(self.device)

    def encode_shard(self, shard: Shard, then: Shard | None = None) -> Iterator[Progress | ShardDone]:
        """Encodes one shard; yields progress, then a `ShardDone` once it is committed.

        `then` is the shard this encoder will most likely be given next: once `shard`'s samples are
        all read, the first of `then`'s are read and handed to the decoding processes, so that they
        decode while the last batches of `shard` encode and commit, and the model does not wait for
        them when `then` starts. A next call with another shard drops what was read ahead."""
        assert self._launched is None, "a batch of the last shard is still in flight"  # (landed or dropped)
        reading, self._ahead = self._ahead, None
        if reading is not None and reading.shard != shard:
            reading.discard()
            reading = None
        reading = reading or self._open(shard)
        writer = ShardWriter(self.root, shard.name, shard.source, self.constants)
        self._waited = self._in_model = 0.0
        try:
            yield from self._encode(reading, writer, then)
            marker = writer.commit()
        except BaseException:
            self._launched = None  # its rows belonged to this attempt's writer
            writer.abort()
            if self._ahead is not None:  # the decoding processes may be what failed: `then` starts afresh
                self._ahead.discard()
                self._ahead = None
            raise
        errors = [r for r in writer.rows if r["status"] == "error"]
        reasons = [f"{r['key']}: {r['error']}" for r in errors]
        kinds = Counter(reason_kind(r["error"]) for r in errors)
        yield ShardDone(
            marker, reasons, kinds, read_ahead=reading.read_ahead, decode_wait_s=self._waited, model_s=self._in_model
        )

    def _open(self, shard: Shard) -> _Reading:
        damage: list[str] = []
        limits = self.config.limits
        samples = read_shard(shard.source, damage.append, limits.max_member_bytes, allow_shell=self.allow_shell)
        return _Reading(shard, samples, damage)

    def _admit(self, reading: _Reading, raw: RawSample) -> None:
        """Puts a sample read into the window: its video to a decoding process, or its error."""
        if raw.key in reading.seen:
            first = reading.seen[raw.key]
            reading.window.append(_Pending(raw, {}, error=f"duplicate key (first at index {first} of this shard)"))
        else:
            reading.seen[raw.key] = raw.index
            reading.window.append(self._prepare(raw))
            reading.held += reading.window[-1].nbytes

    def _read_ahead(self, shard: Shard, room: int) -> None:
        """Reads the first samples of `shard` into its window (up to the decode depth, within `room`
        bytes); a tar that cannot be read is recorded, for that shard's attempt to fail with."""
        self._ahead = self._open(shard)
        self._top_up(self._ahead, room)

    def _top_up(self, reading: _Reading, room: int) -> None:
        """Reads more of a shard read ahead into its window, up to the decode depth, while it holds
        less than `room` bytes (the room the current shard's window leaves)."""
        if reading.failed is not None:
            return
        try:
            while len(reading.window) < self._depth() and reading.held < room:
                raw = next(reading.samples, None)
                if raw is None:
                    break
                self._admit(reading, raw)
        except Exception as e:  # `shard`'s failure, not the shard being finished
            reading.failed = e
        reading.read_ahead = len(reading.window)

    def _depth(self) -> int:
        return self.config.run.batch_size + 2 * self.config.run.decode_threads

    def _encode(self, reading: _Reading, writer: ShardWriter, then: Shard | None) -> Iterator[Progress]:
        if reading.failed is not None:
            raise reading.failed
        window = reading.window
        batches: dict[str | None, list[_Decoded]] = {}  # per bucket (None: no buckets), in first-seen order
        depth = self._depth()
        limits = self.config.limits

        def finish(items: list[_Decoded]) -> Iterator[Progress]:
            for item in items:
                if item.error is not None:
                    writer.add_error(item.raw.key, item.raw.index, item.error, item.fields)
                    yield Progress(1, 0, 1)
                    continue
                assert item.clip is not None
                bucket = item.clip.plan.bucket
                batch = batches.setdefault(None if bucket is None else bucket.name, [])
                batch.append(item)
                if len(batch) == (self.config.run.batch_size if bucket is None else bucket.batch_size):
                    yield from self._flush(batch, writer)

        def leave() -> Iterator[Progress]:
            """The window's oldest sample leaves it, for the model; once this shard is all read, the
            next shard's window (`then`'s, read ahead) grows into the room it leaves."""
            pending = window.popleft()
            reading.held -= pending.nbytes
            if self._ahead is not None:
                self._top_up(self._ahead, limits.window_bytes - reading.held)
            yield from finish(self._resolve(pending))

        for raw in reading.samples:
            self._admit(reading, raw)
            # The window is kept full, bounded in samples and in bytes (a sample over the byte budget
            # is decoded alone): a sample leaves it only for one to take its place, so that the
            # decoding processes always hold the next batches' samples while the model encodes.
            while window and (len(window) > depth or reading.held > limits.window_bytes):
                yield from leave()
        if then is not None and self.config.run.read_ahead:
            self._read_ahead(then, limits.window_bytes - reading.held)
        while window:
            yield from leave()
        for batch in batches.values():
            if batch:
                yield from self._flush(batch, writer)
        yield from self._land_last(writer)
        for reason in reading.damage:  # damage inside a readable tar; a shard that cannot be read raised above
            writer.add_shard_error(f"{reason} ({len(writer.rows)} samples read before it)")
            yield Progress(0, 0, 1)

    def _prepare(self, raw: RawSample) -> _Pending:
        """Splits a sample and hands its video to a decoding process."""
        fields: dict[str, Any] = {}
        try:
            parts = split_sample(raw, self.config.video.extensions)
            fields.update(caption=parts.caption, meta=parts.meta)
            if parts.problem is not None or parts.video is None:
                return _Pending(raw, fields, error=parts.problem)
            nbytes = sum(len(b) for b in raw.files.values()) + self.clip_bytes
            return _Pending(raw, fields, clip=self.decoder.submit(parts.video, self.clip_spec, raw.key), nbytes=nbytes)
        except Exception as e:  # the per-sample boundary: nothing a sample holds takes the shard down
            return _Pending(raw, fields, error=f"decode failed: {describe_error(e)}")

    def _resolve(self, pending: _Pending) -> list[_Decoded]:
        """Waits for a sample's clips; whatever happened to it ends here as an error at worst."""
        raw, fields = pending.raw, pending.fields
        if pending.clip is None:
            return [_Decoded(raw, fields, error=pending.error)]
        started = time.perf_counter()
        try:
            clips = pending.clip.result()
        except VideoError as e:
            return [_Decoded(raw, fields, error=str(e))]
        except DecodeUnavailable:
            raise  # the worker's failure: the attempt fails and is retried, no sample is blamed
        except Exception as e:
            return [_Decoded(raw, fields, error=f"decode failed: {describe_error(e)}")]
        finally:
            self._waited += time.perf_counter() - started
        out = []
        for clip in clips:
            info, plan = clip.info, clip.plan
            per_clip = {
                **fields,
                "clip": plan.index,
                "num_frames": plan.num_frames,
                "height": plan.height,
                "width": plan.width,
                "fps": info.fps,
                "frame_stride": plan.stride,
                "frame_indices": list(plan.frames),
                "clip_start": plan.frames[0] / info.fps if info.fps > 0 else 0.0,
                "bucket": None if plan.bucket is None else plan.bucket.name,
                "src_width": info.width,
                "src_height": info.height,
                "src_num_frames": info.num_frames,
                "src_rotation": info.rotation,
                "src_duration": info.duration,
                "codec": info.codec,
            }
            out.append(_Decoded(raw, per_clip, clip=clip))
        return out

    def _flush(self, batch: list[_Decoded], writer: ShardWriter) -> Iterator[Progress]:
        """Gives a batch to the model (or, if that fails, each item alone), then writes the batch given
        before it (`run.write_behind`; else this one). On a GPU the model's call returns while the
        encoder runs: the host writes the last batch's latents, and waits for and stacks the next
        batch's clips, while the device encodes this one."""
        items = list(batch)
        batch.clear()
        started = time.perf_counter()
        try:
            launched = self._run_model(items)
        except Exception as e:
            if len(items) == 1:
                launched = _Launched(items, [e])
            else:
                log.warning("batch of %d failed (%s); encoding one at a time", len(items), describe_error(e))
                launched = _Launched(items, [self._run_model_safely(item) for item in items])
        self._in_model += time.perf_counter() - started
        if self.config.run.write_behind:
            launched, self._launched = self._launched, launched
        if launched is not None:
            yield self._land(launched, writer)

    def _land_last(self, writer: ShardWriter) -> Iterator[Progress]:
        """Writes the batch still in flight (the shard's last), before the shard commits."""
        launched, self._launched = self._launched, None
        if launched is not None:
            yield self._land(launched, writer)

    def _land(self, launched: _Launched, writer: ShardWriter) -> Progress:
        """Waits until a batch's latents are on the host, then writes them (or each item's error)."""
        if launched.ready is not None:
            started = time.perf_counter()
            launched.ready.synchronize()  # (an error of the device's raises here: the shard's attempt fails)
            self._in_model += time.perf_counter() - started
        frames = errors = 0
        for item, result in zip(launched.items, launched.results):
            if isinstance(result, Exception):
                writer.add_error(item.raw.key, item.raw.index, f"encode failed: {describe_error(result)}", item.fields)
                errors += 1
            else:
                try:
                    clip = item.fields["clip"] if self.request.multi_clip else None
                    writer.add(item.raw.key, item.raw.index, result, item.fields, clip)
                    frames += item.fields["num_frames"]
                except ValueError as e:  # nothing of it was written
                    writer.add_error(item.raw.key, item.raw.index, str(e), item.fields)
                    errors += 1
        return Progress(len(launched.items), frames, errors)

    def _run_model_safely(self, item: _Decoded) -> dict[str, torch.Tensor] | Exception:
        try:
            launched = self._run_model([item])
            if launched.ready is not None:
                launched.ready.synchronize()
            return launched.results[0]
        except Exception as e:
            return e

    def _pinned(self) -> bool:
        return self.device.type == "cuda" and self.config.run.pin_memory

    def _host_batch(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The clips stacked into one host tensor: on a GPU with `run.pin_memory`, into page-locked
        memory from PyTorch's cache of it, which hands a block out again only once the copies from
        it are done (the next batch is stacked while this one may still be on its way)."""
        if not self._pinned():
            return torch.stack(pixels)
        out = torch.empty((len(pixels), *pixels[0].shape), dtype=pixels[0].dtype, pin_memory=True)
        return torch.stack(pixels, out=out)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A result's copy on the host, in the stored dtype: from a GPU with `run.pin_memory`, into
        page-locked memory without waiting (the batch's `ready` event says when it is there)."""
        if not self._pinned():
            return tensor.to("cpu", self.latent_dtype)
        host = torch.empty(tensor.shape, dtype=self.latent_dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def _device_batch(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The clips as one `B C T H W` batch in [-1, 1] on the device, in the model's dtype. uint8
        clips cross to the device as they are and become floats there (`signed_unit`: the bits of
        the float path); a batch that mixes uint8 and float clips is made float on the host."""
        if len({p.dtype for p in pixels}) > 1:
            pixels = [signed_unit(p) for p in pixels]
        x = self._host_batch(pixels)
        if x.dtype != torch.uint8:
            return x.to(self.device, self.dtype, non_blocking=True)
        return signed_unit(x.to(self.device, non_blocking=True)).to(self.dtype)

    @torch.inference_mode()
    def _run_model(self, items: list[_Decoded]) -> _Launched:
        assert all(item.clip is not None for item in items)
        x = self._device_batch([item.clip.pixels for item in items])  # type: ignore[union-attr]
        if self.config.run.channels_last:
            x = channels_last_input(self.preset, x)
        seed = self.config.vae.seed
        generators = [
            torch.Generator().manual_seed(sample_seed(seed, item.raw.key, item.fields["clip"])) for item in items
        ]
        # Planned per input shape (and cached): untiled when it fits the memory budget.
        plan = plan_encode(self.preset, tuple(x.shape), x.dtype, self.tiling, x.device)
        try:
            z, posterior = encode_video(
                self.model, self.preset, x, sample=self.config.vae.sample, generator=generators, tiling=plan
            )
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise
        out = []
        for i, item in enumerate(items):
            item.fields["tiling"] = plan.describe()
            tensors = {"latent": z[i]}
            if self.config.latents.store_posterior and posterior is not None:
                tensors.update(mean=posterior.mean[i], logvar=posterior.logvar[i])
            out.append({k: self._to_host(v) for k, v in tensors.items()})
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event(blocking=True)  # (waited for asleep: the decoding processes get the CPU)
            ready.record()
        return _Launched(items, list(out), ready)
