"""What the benchmarks share for the README: the hardware line, and rewriting a marked block.

A block is the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in a Markdown file;
`python benchmarks/throughput.py --readme README.md` rewrites "throughput",
`python benchmarks/encoder.py --readme README.md` rewrites "encoder".
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def hardware(device: str) -> str:
    """The chip and cores the figures come from, e.g. "NVIDIA H200, 16 CPU cores"."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    model = ""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else ""
    except OSError:
        pass
    return f"{model or platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def replace_block(path: Path, name: str, lines: list[str]) -> None:
    """Replaces the block `name` of `path` by `lines` (the markers are kept)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text()
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"{path} has no {begin} ... {end} block to rewrite")
    path.write_text(text[:start] + "\n".join([begin, *lines, end]) + text[stop + len(end) :])
