"""The dataset's control files: job.json, the commit markers, manifest.json and the lock.

`job.json` says how the latents were made (the settings and their fingerprint); a shard is done
when its commit marker exists, carries the job's fingerprint and its files have the recorded
sizes; `manifest.json` lists every committed shard once the whole job is done. A consumer that
trusts only markers and the manifest never sees a partial shard. Every function takes the dataset
root as a local path, an `s3://` URL or a `Store` (`jobs.dataset.store`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobs.dataset.layout import (
    COMMITS_DIR,
    JOB_FILE,
    LATENTS_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    META_DIR,
    ShardFiles,
    is_temporary,
)
from jobs.dataset.store import Lost, Store, open_store

Root = str | Path | Store  # a dataset root, as every reader takes it

READERS = 16  # files read at once when a reader goes through every shard (markers, metadata)

# What the manifest keeps of each commit marker (the rest, time and host, is the marker's own).
MANIFEST_FIELDS = ("name", "source", "samples", "ok", "errors", "frames", "latents", "meta")


class DatasetError(ValueError):
    """A directory that cannot be used as (or turned into) a latent dataset."""


class DatasetBusy(DatasetError):
    """Another job holds the dataset's lock."""


def json_bytes(data: dict[str, Any]) -> bytes:
    """How every control file is written: sorted keys, indented, a final newline."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


@dataclass
class JobRecord:
    """What `job.json` holds."""

    fingerprint: str
    settings: dict[str, Any]  # everything that determines the output bytes
    config: dict[str, Any]  # the resolved job config
    inputs: list[str]  # the input shards' sources
    command: list[str]  # the command line that made it


def write_job(root: Root, job: JobRecord) -> None:
    open_store(root).write(JOB_FILE, json_bytes(asdict(job)))


def read_job(root: Root) -> JobRecord:
    """The `job.json` of a dataset.

    Raises:
        DatasetError: No `job.json`, or not one this project wrote (or a root that cannot hold one).
    """
    try:
        store = open_store(root)
        path = f"{store}/{JOB_FILE}"
        data = json.loads(store.read_bytes(JOB_FILE))
    except FileNotFoundError:
        raise DatasetError(f"{root} is not a latent dataset (no {JOB_FILE})") from None
    except (OSError, ValueError) as e:
        if isinstance(e, json.JSONDecodeError):
            raise DatasetError(f"{path} is not valid JSON ({e}); is this a latent dataset?") from None
        raise DatasetError(f"cannot read {root}: {e}") from None
    try:
        return JobRecord(
            fingerprint=data["fingerprint"],
            settings=data["settings"],
            config=data["config"],
            inputs=data.get("inputs", []),
            command=data.get("command", []),
        )
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{path} is not a precompute job file ({type(e).__name__}: {e})") from None


def existing_job(root: Root) -> JobRecord | None:
    """The job a directory holds; None for a new or empty directory.

    Raises:
        DatasetError: A directory with other things in it, or an unreadable `job.json`.
    """
    store = open_store(root)
    if store.exists(JOB_FILE):
        return read_job(store)
    # What a job killed before writing `job.json` leaves (its lock, temporaries) is a fresh directory.
    others = [rel for rel in store.list() if rel != LOCK_FILE and not is_temporary(Path(rel))]
    if others:
        raise DatasetError(f"{store} is not empty and is not a latent dataset (no {JOB_FILE}; it holds {others[0]})")
    return None


def read_commit(root: Root, name: str, verify: bool = False) -> dict[str, Any] | None:
    """The commit marker of a shard, or None if the shard is not (validly) committed.

    The files the marker names must exist with the recorded sizes; with `verify`, also with the
    recorded sha256 (this reads them: a same-size corruption passes without it).

    Raises:
        OSError: The marker or its files could not be read (an I/O or network error): whether the
            shard is committed is not known, and a caller that took it for not committed would
            remove its marker.
    """
    store = open_store(root)
    try:
        marker = json.loads(store.read_bytes(ShardFiles(name).commit))
        for part in ("latents", "meta"):
            rel = marker[part]["path"]
            if store.size(rel) != marker[part]["bytes"]:
                return None
            if verify and store.sha256(rel) != marker[part]["sha256"]:
                return None
    except FileNotFoundError:  # no marker (or a file gone since it was sized)
        return None
    except (ValueError, KeyError, TypeError):  # not a marker of ours
        return None
    return marker


def withdraw_commit(root: Root, name: str) -> bool:
    """Removes a shard's commit marker (one that no longer stands for its files); True if there was one."""
    return open_store(root).delete(ShardFiles(name).commit)


def remove_uncommitted(root: Root, patience: float = 5.0) -> list[str]:
    """Removes the data files of every shard that has no commit marker (what an attempt killed
    between publishing its files and its marker leaves), so that a stopped job leaves no
    final-named file that a glob over `latents/` would take for data; the shards removed.

    Each shard is handled under its commit lock and only if it still has no marker; a shard whose
    lock is held is retried for `patience` seconds, then left to the attempt holding it. Run by
    the job holding the directory's lock, once its own attempts are over.
    """
    store = open_store(root)
    names = set(_shard_names(store, LATENTS_DIR, ".tar")) | set(_shard_names(store, META_DIR, ".parquet"))
    removed, busy = [], sorted(names)
    deadline = time.monotonic() + patience
    while busy:
        held = []
        for name in busy:
            files = ShardFiles(name)
            try:
                with store.lock(files.lock, wait=False):
                    if not store.exists(files.commit):
                        for rel in (files.latents, files.meta):
                            store.delete(rel)
                        removed.append(name)
            except BlockingIOError:
                held.append(name)
        if not held or time.monotonic() > deadline:
            break  # what is still held is some attempt's to finish or abort
        busy = held
        time.sleep(0.2)  # a process that was just killed releases its locks as it exits
    return sorted(removed)


def marker_names(root: Root) -> list[str]:
    """The shard names of every commit marker of the directory (valid or not), sorted."""
    return _shard_names(open_store(root), COMMITS_DIR, ".json")


def _shard_names(store: Store, folder: str, suffix: str) -> list[str]:
    """The shard names of the files `folder/<name><suffix>` (temporaries aside), sorted."""
    start = len(folder) + 1
    rels = store.list(folder)
    return [rel[start:].removesuffix(suffix) for rel in rels if rel.endswith(suffix) and not is_temporary(Path(rel))]


def committed_markers(root: Root, fingerprint: str | None = None) -> list[dict[str, Any]]:
    """The valid markers of every shard of the directory committed with `fingerprint` (None: with
    any), by name.

    Raises:
        OSError: A marker or its files could not be read (`read_commit`): a shard is never left out
            of a listing for a read that failed.
    """
    store = open_store(root)
    with ThreadPoolExecutor(READERS) as pool:  # on an object store each marker is a few requests
        markers = list(pool.map(lambda name: read_commit(store, name), marker_names(store)))
    return [m for m in markers if m is not None and fingerprint in (None, m.get("fingerprint"))]


def write_manifest(root: Root, fingerprint: str) -> dict[str, Any]:
    """Writes `manifest.json`: every shard of the directory committed with `fingerprint`, and the
    totals, whichever run committed it (a rerun with other inputs adds to the same dataset).

    Raises:
        OSError: A marker could not be read (nothing is written: the manifest never leaves it out).
    """
    shards = [{k: m[k] for k in MANIFEST_FIELDS} for m in committed_markers(root, fingerprint)]
    manifest = {
        "fingerprint": fingerprint,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "ok": sum(s["ok"] for s in shards),
        "errors": sum(s["errors"] for s in shards),
        "frames": sum(s["frames"] for s in shards),
    }
    open_store(root).write(MANIFEST_FILE, json_bytes(manifest))
    return manifest


BUSY_TRIES, BUSY_WAIT_S = 6, 0.1  # the output lock's tries, and the pause between them


@contextmanager
def output_lock(root: Root) -> Iterator[Lost]:
    """Holds an exclusive lock on the dataset directory (created if needed) while the job writes it;
    gives the lock's `Lost` event (on s3, `taken` once another job took the lease over: this one
    must stop).

    Raises:
        DatasetBusy: Another job holds it. A lock left by a killed job is released with its process
            (on s3: taken over once the dead job's lease runs out, at once on the same machine).
    """
    store = open_store(root)
    with ExitStack() as held:
        # A reader asking whether a job runs (`jobs.status`) holds the lock shared for an instant:
        # a job that starts in that instant tries again a few times before it calls the directory busy
        for attempt in range(BUSY_TRIES):
            try:
                lost = held.enter_context(store.lock(LOCK_FILE, wait=False))
                break
            except BlockingIOError:
                if attempt == BUSY_TRIES - 1:
                    raise DatasetBusy(f"another precompute job is writing to {store}") from None
                time.sleep(BUSY_WAIT_S)
        yield lost  # what the job raises passes through unchanged


def lock_held(root: Root) -> bool:
    """Whether a job holds the directory's lock now (asked without creating the lock)."""
    return open_store(root).lock_held(LOCK_FILE)
