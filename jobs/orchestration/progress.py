"""What the driver shows: a progress line (redrawn on a terminal, log lines otherwise) and the summary."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressBar:
    """Samples done of total, rate and ETA.

    On a terminal the line is redrawn in place at most `refresh` times a second; elsewhere
    (`ray job logs`, CI, a file) a plain line is printed every `log_every` seconds.
    """

    def __init__(
        self,
        total: int,
        shards: int,
        stream: TextIO | None = None,
        refresh: float = 0.1,
        log_every: float = 10.0,
    ) -> None:
        self.total = total
        self.shards = shards
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = refresh if self.tty else log_every
        self.samples = self.frames = self.shards_done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, samples: int = 0, frames: int = 0, shards: int = 0) -> None:
        self.samples += samples
        self.frames += frames
        self.shards_done += shards
        self.total = max(self.total, self.samples)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.samples / elapsed
        pct = 100.0 * self.samples / self.total if self.total else 100.0
        width = 24
        filled = int(width * pct / 100)
        eta = format_seconds((self.total - self.samples) / rate) if rate > 0 else "?"
        return (
            f"{self.samples}/{self.total} samples {pct:5.1f}% |{'#' * filled}{'.' * (width - filled)}| "
            f"{rate:.2f} samples/s, {self.frames / elapsed:.1f} frames/s, "
            f"ETA {eta}, shards {self.shards_done}/{self.shards}, {format_seconds(elapsed)} elapsed"
        )

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


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

    @property
    def complete(self) -> bool:
        return not self.failed and self.stopped is None

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
        lines.append(f"output: {self.output}")
        return "\n".join(lines)
