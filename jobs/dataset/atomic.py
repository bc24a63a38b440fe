"""How a file of the dataset appears complete or not at all: temporary names, fsync, rename.

Every file is written under a hidden temporary name beside its final one
(`.<name>.<random>.tmp`), flushed to disk, and renamed into place; a reader never sees half a
file under a final name, and leftovers of an interrupted write are recognisable by name.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from jobs.dataset.layout import DATA_DIRS, TMP_SUFFIX, is_temporary


def temp_path(final: Path) -> Path:
    """A fresh hidden temporary name beside `final` (whose folder is created)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def sync_close(f: BinaryIO) -> None:
    """Flushes a file to disk and closes it."""
    f.flush()
    os.fsync(f.fileno())
    f.close()


def sync_dir(path: Path) -> None:
    """Makes the renames inside a folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Writes JSON to a temporary sibling, fsyncs it, and renames it over `path`."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written temporary behind
        raise


def remove_temporaries(root: str | Path) -> int:
    """Deletes leftovers of interrupted writes; returns how many were removed."""
    removed = 0
    for sub in (*DATA_DIRS, ""):
        base = Path(root) / sub
        pattern = f".*{TMP_SUFFIX}"
        for tmp in base.rglob(pattern) if sub else base.glob(pattern):
            if is_temporary(tmp) and tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed
