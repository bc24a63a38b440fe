"""A small progress display for the driver: a redrawn line on a terminal, log lines otherwise."""

from __future__ import annotations

import sys
import time
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
