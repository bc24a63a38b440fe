"""What the driver shows: a progress line (redrawn on a terminal, log lines otherwise) and the summary."""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TextIO


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SampleCount(NamedTuple):
    """The samples a run expects, as far as they were counted before it started."""

    known: int  # samples in the shards that could be counted (local tars, from their headers)
    uncounted: int  # shards not counted (remote, `pipe:`): reading their headers would mean reading them

    def __str__(self) -> str:
        if not self.uncounted:
            return str(self.known)
        return f"{self.known}+?" if self.known else "?"


class ProgressBar:
    """Samples done of total, errors, rates and ETA.

    On a terminal the line is redrawn in place at most `refresh` times a second; elsewhere
    (`ray job logs -f`, CI, a file) a plain line is printed every `log_every` seconds, with each
    encoder actor's rate after it (no carriage returns).

    `total` counts the samples of the counted shards; the samples of the `uncounted` ones (or of
    all, once more samples arrive than were counted, as with several clips per video) are
    estimated from the samples per committed shard so far, and shown as `~N`, `~P%`, `ETA ~T`.
    """

    def __init__(
        self,
        total: int,
        shards: int,
        stream: TextIO | None = None,
        refresh: float = 0.1,
        log_every: float = 10.0,
        uncounted: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.shards = shards
        self.uncounted = uncounted
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = refresh if self.tty else log_every
        self.clock = clock
        self.samples = self.frames = self.shards_done = self.errors = 0
        self.per_actor: Counter[str] = Counter()  # samples by encoder actor ("w0", "w1", ...)
        self.start = clock()
        self._last = -math.inf  # the first update draws

    def update(self, samples: int = 0, frames: int = 0, shards: int = 0, errors: int = 0, actor: str = "") -> None:
        self.samples += samples
        self.frames += frames
        self.shards_done += shards
        self.errors += errors
        if actor and samples:
            self.per_actor[actor] += samples
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            self._draw()

    def expected(self) -> tuple[float | None, bool]:
        """The samples the run will have done, and whether that is an estimate (None: none yet).

        While shards are pending an estimate stays above the samples done, so it never claims 100%.
        """
        if self.shards_done >= self.shards:
            return (self.samples if self.uncounted else max(self.total, self.samples)), False
        if not self.uncounted and self.samples < self.total:
            return self.total, False
        if not self.shards_done:
            return None, True
        per_shard = self.samples / self.shards_done  # includes the shards in flight: a little high
        guess = self.total + self.uncounted * per_shard
        if guess <= self.samples:  # the counts were short: the pending shards' share, by shard
            guess = self.samples * self.shards / self.shards_done
        return guess, True

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.samples / elapsed
        expected, estimated = self.expected()
        width = 24
        if expected is None:
            total, percent, filled, eta = "?", "    ?%", 0, "?"
        else:
            pct = 100.0 * self.samples / expected if expected else 100.0
            if estimated:
                pct = min(pct, 99.9)
            filled = int(width * pct / 100)
            left = (expected - self.samples) / rate if rate > 0 else None
            if estimated:
                total, percent = f"~{expected:.0f}", f"~{pct:.1f}%"
                eta = "?" if left is None else "~" + format_seconds(max(left, 1.0))
            else:
                total, percent = str(int(expected)), f"{pct:5.1f}%"
                eta = "?" if left is None else format_seconds(left)
        shards = f"shards {self.shards_done}/{self.shards}" + (
            f" ({self.uncounted} uncounted)" if self.uncounted else ""
        )
        return (
            f"{self.samples}/{total} samples {percent} |{'#' * filled}{'.' * (width - filled)}| "
            f"{self.errors} errors, {rate:.2f} samples/s, {self.frames / elapsed:.1f} frames/s, "
            f"ETA {eta}, {shards}, {format_seconds(elapsed)} elapsed"
        )

    def actors_line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        return ", ".join(f"{a} {n / elapsed:.2f}/s" for a, n in sorted(self.per_actor.items()))

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
        else:
            actors = self.actors_line()
            self.stream.write(self.line() + (f" | per actor: {actors}" if actors else "") + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own amid the progress lines (on a terminal: above the bar, which is redrawn)."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        if self.tty:
            self._draw()
        else:
            self.stream.flush()

    def close(self) -> None:
        self._draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def time_shares(actors: Iterable[dict[str, float]]) -> tuple[float, float]:
    """The shares of the actors' shard time (their `report.json` figures) that the model worked and
    that it waited for decoding; zeros before any shard was committed."""
    actors = list(actors)
    seconds = sum(a["seconds"] for a in actors)
    if not seconds:
        return 0.0, 0.0
    return (
        sum(a.get("model_s", 0.0) for a in actors) / seconds,
        sum(a.get("decode_wait_s", 0.0) for a in actors) / seconds,
    )


def time_split(actors: Iterable[dict[str, float]]) -> str | None:
    """Where the actors' time went: the model at work, waiting for decoding, the rest (reading,
    writing, commits); a model that waits says that decoding or the input's storage is what to
    scale. None before any shard was committed."""
    actors = list(actors)
    if not sum(a["seconds"] for a in actors):
        return None
    model, waited = time_shares(actors)
    return (
        f"the actors' time: {model:.0%} in the model, {waited:.0%} waiting for decoding, "
        f"{max(0.0, 1 - model - waited):.0%} reading, writing and committing"
    )


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
    reason_kinds: Counter[str] = field(default_factory=Counter)  # error rows by reason, numbers elided
    stopped: str | None = None  # why the job stopped before every shard was done (the error budget)
    interrupted: str | None = None  # Ctrl-C or SIGTERM: what is committed stays
    shard_seconds: dict[str, float] = field(default_factory=dict)  # committed shard -> seconds of its attempt
    shard_samples: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0  # latent tars and Parquet files committed by this run
    actors: dict[str, dict[str, float]] = field(default_factory=dict)  # "w0" -> samples, shards, seconds busy

    @property
    def complete(self) -> bool:
        return not self.failed and self.stopped is None and self.interrupted is None

    def slowest(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.shard_seconds.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def report(self) -> dict[str, Any]:
        """What `DIR/report.json` holds about the last run."""
        return {
            "complete": self.complete,
            "fingerprint": self.fingerprint,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "errors": self.errors,
            "frames": self.frames,
            "frames_per_s": round(self.frames / self.seconds, 3) if self.seconds else 0.0,
            "bytes_written": self.bytes_written,
            "shards": {
                "written": self.shards_written,
                "already_committed": self.shards_skipped,
                "failed": dict(self.failed),
            },
            "slowest_shards": [
                {"name": name, "seconds": round(sec, 3), "samples": self.shard_samples.get(name, 0)}
                for name, sec in self.slowest()
            ],
            "error_reasons": [{"reason": kind, "count": n} for kind, n in self.reason_kinds.most_common()],
            "actors": {
                name: {
                    **stats,
                    "samples_per_s": round(stats["samples"] / stats["seconds"], 3) if stats["seconds"] else 0.0,
                    # the share of its shards' time (dispatch to commit) that the model was working
                    "model_busy": round(stats.get("model_s", 0.0) / stats["seconds"], 3) if stats["seconds"] else 0.0,
                }
                for name, stats in sorted(self.actors.items())
            },
            "stopped": self.stopped,
            "interrupted": self.interrupted,
        }

    def most_common(self, n: int = 3) -> str:
        return "; ".join(f"{kind} ({count})" for kind, count in self.reason_kinds.most_common(n))

    def text(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        lines = [
            f"done in {format_seconds(self.seconds)}: {self.ok} ok, {self.errors} errors, "
            f"{self.frames} frames encoded ({rate:.1f} frames/s)",
            f"shards: {self.shards_written} written, {self.shards_skipped} already committed, "
            f"{len(self.failed)} failed",
        ]
        if self.shards_written:
            lines.append(f"written: {format_bytes(self.bytes_written)} of latents and metadata")
            slow = ", ".join(f"{name} ({format_seconds(sec)})" for name, sec in self.slowest(3))
            lines.append(f"slowest shards: {slow}")
        if busy := time_split(self.actors.values()):
            lines.append(busy)
        if self.reason_kinds:
            lines.append(f"errors by reason: {self.most_common(5)}")
        for reason in self.error_reasons[:5]:
            lines.append(f"  error row: {reason}")
        if len(self.error_reasons) > 5:
            lines.append(f"  ... and {len(self.error_reasons) - 5} more (status = 'error' in the metadata)")
        for name, reason in self.failed.items():
            lines.append(f"  FAILED shard {name}: {reason}")
        if self.failed:
            lines.append("  rerun the same command to retry the failed shards")
        if self.stopped is not None:
            lines.append(f"  STOPPED: {self.stopped}")
            lines.append("  committed shards are kept: fix the cause and rerun the same command to go on")
        if self.interrupted is not None:
            lines.append(
                f"  INTERRUPTED ({self.interrupted}): committed shards are kept; rerun the same command to go on"
            )
        lines.append(f"output: {self.output} (report.json: this run's figures)")
        return "\n".join(lines)
