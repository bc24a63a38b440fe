"""The dataset's control files: job.json, the commit markers, manifest.json and the lock.

`job.json` says how the latents were made (the settings and their fingerprint); a shard is done
when its commit marker exists, carries the job's fingerprint and its files have the recorded
sizes; `manifest.json` lists every committed shard once the whole job is done. A consumer that
trusts only markers and the manifest never sees a partial shard.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobs.dataset.atomic import sync_dir, write_json_atomic
from jobs.dataset.layout import COMMITS_DIR, DATA_DIRS, JOB_FILE, LOCK_FILE, MANIFEST_FILE, ShardFiles, is_temporary
from vae.checkpoint import file_sha256

# What the manifest keeps of each commit marker (the rest, time and host, is the marker's own).
MANIFEST_FIELDS = ("name", "source", "samples", "ok", "errors", "frames", "latents", "meta")


class DatasetError(ValueError):
    """A directory that cannot be used as (or turned into) a latent dataset."""


class DatasetBusy(DatasetError):
    """Another job holds the dataset's lock."""


@dataclass
class JobRecord:
    """What `job.json` holds."""

    fingerprint: str
    settings: dict[str, Any]  # everything that determines the output bytes
    config: dict[str, Any]  # the resolved job config
    inputs: list[str]  # the input shards' sources
    command: list[str]  # the command line that made it


def write_job(root: Path, job: JobRecord) -> None:
    write_json_atomic(root / JOB_FILE, asdict(job))


def read_job(root: str | Path) -> JobRecord:
    """The `job.json` of a dataset.

    Raises:
        DatasetError: No `job.json`, or not one this project wrote.
    """
    path = Path(root) / JOB_FILE
    if not path.is_file():
        raise DatasetError(f"{root} is not a latent dataset (no {JOB_FILE})")
    try:
        data = json.loads(path.read_text())
        return JobRecord(
            fingerprint=data["fingerprint"],
            settings=data["settings"],
            config=data["config"],
            inputs=data.get("inputs", []),
            command=data.get("command", []),
        )
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); is this a latent dataset?") from None
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{path} is not a precompute job file ({type(e).__name__}: {e})") from None


def existing_job(root: Path) -> JobRecord | None:
    """The job a directory holds; None for a new or empty directory.

    Raises:
        DatasetError: A directory with other things in it, or an unreadable `job.json`.
    """
    if (root / JOB_FILE).exists():
        return read_job(root)
    if root.exists() and not _only_leftovers(root):
        raise DatasetError(f"{root} is not empty and is not a latent dataset (no {JOB_FILE})")
    return None


def _only_leftovers(root: Path) -> bool:
    """Whether `root` holds nothing but what a job killed before writing `job.json` leaves: its lock,
    temporaries, and data folders holding only temporaries (such a directory is a fresh one)."""
    for path in root.iterdir():
        if path.name == LOCK_FILE or is_temporary(path):
            continue
        if path.is_dir() and path.name in DATA_DIRS and all(p.is_dir() or is_temporary(p) for p in path.rglob("*")):
            continue
        return False
    return True


def read_commit(root: str | Path, name: str, verify: bool = False) -> dict[str, Any] | None:
    """The commit marker of a shard, or None if the shard is not (validly) committed.

    The files the marker names must exist with the recorded sizes; with `verify`, also with the
    recorded sha256 (this reads them: a same-size corruption passes without it).
    """
    root = Path(root)
    path = root / ShardFiles(name).commit
    try:
        marker = json.loads(path.read_text())
        for part in ("latents", "meta"):
            f = root / marker[part]["path"]
            if not f.is_file() or f.stat().st_size != marker[part]["bytes"]:
                return None
            if verify and file_sha256(f) != marker[part]["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable or not a marker of ours
        return None
    return marker


def committed(
    root: str | Path, name: str, fingerprint: str, source: str, verify: bool = False
) -> dict[str, Any] | None:
    """The marker of a shard committed by this job (same fingerprint, same input); else None."""
    marker = read_commit(root, name, verify)
    if marker is None or marker.get("fingerprint") != fingerprint or marker.get("source") != source:
        return None
    return marker


def withdraw_commit(root: str | Path, name: str) -> bool:
    """Removes a shard's commit marker (one that no longer stands for its files); True if there was one."""
    path = Path(root) / ShardFiles(name).commit
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    sync_dir(path.parent)
    return True


def committed_markers(root: str | Path, fingerprint: str) -> list[dict[str, Any]]:
    """The markers of every shard of the directory committed with `fingerprint`, by name."""
    base = Path(root) / COMMITS_DIR
    names = sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.json") if not is_temporary(p))
    markers = [read_commit(root, name) for name in names]
    return [m for m in markers if m is not None and m.get("fingerprint") == fingerprint]


def write_manifest(root: Path, fingerprint: str) -> dict[str, Any]:
    """Writes `manifest.json`: every shard of the directory committed with `fingerprint`, and the
    totals, whichever run committed it (a rerun with other inputs adds to the same dataset)."""
    shards = [{k: m[k] for k in MANIFEST_FIELDS} for m in committed_markers(root, fingerprint)]
    manifest = {
        "fingerprint": fingerprint,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "ok": sum(s["ok"] for s in shards),
        "errors": sum(s["errors"] for s in shards),
        "frames": sum(s["frames"] for s in shards),
    }
    write_json_atomic(root / MANIFEST_FILE, manifest)
    return manifest


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Holds the kernel's exclusive lock (`flock`) on `path`, created with its folder if needed; a
    killed holder's lock goes with its process.

    Raises:
        BlockingIOError: Another process holds it and `wait` is false.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield


@contextmanager
def output_lock(root: Path) -> Iterator[None]:
    """Holds an exclusive lock on the dataset directory (created if needed) while the job writes it.

    Raises:
        DatasetBusy: Another job holds it. A lock left by a killed job is released with its process.
    """
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(root / LOCK_FILE, wait=False))
        except BlockingIOError:
            raise DatasetBusy(f"another precompute job is writing to {root}") from None
        yield  # what the job raises passes through unchanged


def lock_held(root: str | Path) -> bool:
    """Whether a job holds the directory's lock now (asked without creating the lock file)."""
    try:
        fd = os.open(Path(root) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
