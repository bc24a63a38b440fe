"""How a file of the dataset appears complete or not at all: temporary names, fsync, rename.

Every file is written under a hidden temporary name beside its final one
(`.<name>.<random>.tmp`), flushed to disk, and renamed into place; a reader never sees half a
file under a final name, and leftovers of an interrupted write are recognisable by name.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO

from jobs.dataset.layout import TMP_SUFFIX


def temp_path(final: Path) -> Path:
    """A fresh hidden temporary name beside `final` (whose folder is created, durably)."""
    make_dirs(final.parent)
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def make_dirs(folder: Path) -> None:
    """Creates `folder` and its missing parents, each made durable in its parent: a folder's name is
    its parent's content, and without that fsync a crash could lose a new folder with the files
    committed in it, while their markers (in a folder made earlier) stay."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:  # made meanwhile by another attempt, which syncs it too
            pass
        sync_dir(new.parent)


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
