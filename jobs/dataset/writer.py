"""`ShardWriter`: one latent tar, its Parquet metadata and its commit marker, committed atomically.

A shard is written under temporary names in the destination folders and renamed into place
(tar, then Parquet, then the marker), so a visible Parquet file always describes a complete
tar, and a shard counts as done only when its marker exists with the job's fingerprint.
The bytes are deterministic (fixed tar headers, no timestamps in the data files), so a
resumed job ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save as save_safetensors

from jobs.dataset.atomic import sync_close
from jobs.dataset.catalog import Root, json_bytes, read_commit
from jobs.dataset.faults import fault
from jobs.dataset.layout import SCHEMA, SHARD_ROW_KEY, ShardFiles, member_stem
from jobs.dataset.store import LockLost, open_store
from vae.checkpoint import file_sha256
from vae.errors import describe_error

log = logging.getLogger(__name__)
MARKER_TRIES, MARKER_RETRY_S = 3, 1.0  # tries to create a commit marker, and the pause between them

# What a latent's JSON sidecar repeats of its row (enough to train without the Parquet file).
_SIDECAR = (
    "key",
    "clip",
    "caption",
    "num_frames",
    "height",
    "width",
    "fps",
    "frame_stride",
    "frame_indices",
    "bucket",
    "latent_shape",
)

# The range of each integer column; a value outside it (a container that claims 4e9 frames) is unknown.
_INT_RANGES = {
    f.name: (-(2 ** (f.type.bit_width - 1)), 2 ** (f.type.bit_width - 1) - 1)
    for f in SCHEMA
    if pa.types.is_integer(f.type)
}


def storable(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with every value the schema can hold: text made valid UTF-8 (a lone surrogate
    becomes `\\udNNN`), integers outside their column's range set to None (unknown)."""
    out = {}
    for name, value in row.items():
        if isinstance(value, str):
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        elif isinstance(value, int) and not isinstance(value, bool) and name in _INT_RANGES:
            low, high = _INT_RANGES[name]
            value = value if low <= value <= high else None
        out[name] = value
    return out


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self._f.write(b)
        self.sha256.update(memoryview(b)[:n])
        self.nbytes += n
        return n

    def tell(self) -> int:
        return self.nbytes


class ShardWriter:
    """Writes one latent shard and its metadata, then commits them atomically.

    Args:
        root: Dataset root (DIR: a local path, an `s3://` URL or a `Store`).
        name: Output name of the shard (see `jobs.inputs.shards.Shard.name`).
        source: The input shard, recorded in every row.
        constants: Column values shared by every row (fingerprint and VAE identity).
    """

    def __init__(self, root: Root, name: str, source: str, constants: dict[str, Any]) -> None:
        self.store = open_store(root)
        self.files = ShardFiles(name)
        self.source = source
        self.constants = constants
        self.rows: list[dict[str, Any]] = []
        self._shard_errors = 0
        self._tmp: list[Path] = []
        self._placed: list[tuple[str, str | None]] = []  # (final name, version) this attempt published, until committed
        self._stems: dict[str, str] = {}  # member stem -> the key that took it (two of a name break webdataset)
        self._tar_path = self._temp(self.files.latents)
        self._raw = open(self._tar_path, "wb")
        self._hash = _HashingWriter(self._raw)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.PAX_FORMAT)

    def _temp(self, rel: str) -> Path:
        tmp = self.store.staging(rel)
        self._tmp.append(tmp)
        return tmp

    def _add_member(self, name: str, data: bytes) -> int:
        fault("disk-full")
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self._tar.addfile(info, io.BytesIO(data))
        # After addfile the archive offset sits at the end of the 512-byte-padded data.
        return self._tar.offset - _padded(len(data))

    def add(
        self,
        key: str,
        index: int,
        tensors: dict[str, torch.Tensor],
        fields: dict[str, Any],
        clip: int | None = None,
    ) -> None:
        """Adds an encoded clip: its tensors as `<stem>.safetensors`, a JSON sidecar, a row.

        `clip` numbers the clips of a video when it may give several (the stem then says which).
        A sample whose stem (`member_stem`) an earlier sample of the shard took is refused: a tar
        with two members of one name is one webdataset does not read.

        Raises:
            ValueError: The sample cannot be stored (nothing of it was written; make it an error row).
            OSError: Writing the tar failed (the shard fails).
        """
        latent = tensors["latent"]
        row = storable(
            {
                **fields,
                "key": key,
                "index": index,
                "clip": clip or 0,
                "status": "ok",
                "shard": self.files.latents,
                "offset": None,
                "size": None,
                "latent_shape": list(latent.shape),
                "latent_dtype": str(latent.dtype).removeprefix("torch."),
            }
        )
        try:  # everything that can fail for this sample, before anything is written
            blob = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"key": row["key"]})
            sidecar = {k: row.get(k) for k in _SIDECAR}
            sidecar["meta"] = json.loads(row["meta"]) if row.get("meta") else None
            sidecar_bytes = json.dumps(sidecar, sort_keys=True).encode()
            self._check({**row, "offset": 0, "size": len(blob)})
        except (ValueError, TypeError, RecursionError, pa.ArrowException) as e:
            raise ValueError(f"cannot store the sample: {describe_error(e)}") from e
        stem = member_stem(row["key"], clip)
        if stem in self._stems:
            raise ValueError(
                f"cannot store the sample: its member name {stem[:120]!r} is taken by the sample "
                f"{self._stems[stem][:120]!r}"
            )
        row["offset"], row["size"] = self._add_member(f"{stem}.safetensors", blob), len(blob)
        self._add_member(f"{stem}.json", sidecar_bytes)
        self._stems[stem] = row["key"]
        self.rows.append(row)

    def add_error(self, key: str, index: int, reason: str, fields: dict[str, Any] | None = None) -> None:
        """Records a sample that could not be encoded: a row with its reason, nothing in the tar.

        Fields that cannot be stored are dropped (the key, index and reason always can).
        """
        row = storable({"clip": 0, **(fields or {}), "key": key, "index": index, "status": "error", "error": reason})
        try:
            self._check(row)
        except (ValueError, TypeError, pa.ArrowException):
            row = {k: row[k] for k in ("key", "index", "clip", "status", "error")}
        self.rows.append(row)

    def _check(self, row: dict[str, Any]) -> None:
        """Raises if `row` would not convert to the schema (so that the commit cannot fail on it)."""
        pa.Table.from_pylist([self._row(row)], schema=SCHEMA)

    def add_shard_error(self, reason: str) -> None:
        """Records a problem of the shard itself (a truncated tar, a missing file): a row after the samples."""
        self._shard_errors += 1
        self.add_error(SHARD_ROW_KEY, -self._shard_errors, reason)

    def commit(self) -> dict[str, Any]:
        """Completes the tar and the Parquet file as staged files (each fsynced), publishes both
        under their final names, then creates the commit marker: the commit point. Until the
        marker exists nothing of this shard counts as written, and `abort` removes what was placed.

        Publishing and the marker happen under the shard's commit lock, and only if no attempt
        has committed the shard yet: a late ("zombie") attempt of a shard that was retried and
        committed elsewhere drops its own files and returns the committed marker, so a committed
        shard is never rewritten. The marker is created only if absent (a second one is refused
        by the filesystem or the object store), which holds even if a lock were lost; on s3 the
        data objects are too, and a failed attempt removes only the versions it put."""
        self._tar.close()
        sync_close(self._raw)
        tar_sha, tar_bytes = self._hash.sha256.hexdigest(), self._hash.nbytes

        # Rows in input order; shard-level problems (negative index) at the end.
        self.rows.sort(key=lambda r: (r["index"] < 0, abs(r["index"]), r["clip"]))
        table = pa.Table.from_pylist([self._row(r) for r in self.rows], schema=SCHEMA)
        meta_tmp = self._temp(self.files.meta)
        with open(meta_tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        meta_sha, meta_bytes = file_sha256(meta_tmp), meta_tmp.stat().st_size
        fault("slow-commit")
        with self.store.lock(self.files.lock) as lost:  # one committing attempt at a time
            existing = read_commit(self.store, self.files.name)
            if existing is not None and existing.get("fingerprint") == self.constants["fingerprint"]:
                self.abort()  # another attempt committed this shard: its files stay as they are
                return existing
            try:
                return self._place(tar_sha, tar_bytes, meta_tmp, meta_sha, meta_bytes, lost)
            except BaseException:
                self._unplace(lost)  # still under the lock: only the versions this attempt put
                raise

    def _place(
        self, tar_sha: str, tar_bytes: int, meta_tmp: Path, meta_sha: str, meta_bytes: int, lost: threading.Event
    ) -> dict[str, Any]:
        for staged, rel in ((self._tar_path, self.files.latents), (meta_tmp, self.files.meta)):
            self._still_held(lost)
            self._placed.append((rel, self._publish(staged, rel, lost)))  # complete before a marker names it
        fault("before-marker")
        fault("hang-before-marker")
        self._still_held(lost)

        ok = sum(r["status"] == "ok" for r in self.rows)
        marker = {
            "name": self.files.name,
            "source": self.source,
            "fingerprint": self.constants["fingerprint"],
            "samples": len(self.rows),
            "ok": ok,
            "errors": len(self.rows) - ok,
            "frames": sum(r.get("num_frames") or 0 for r in self.rows if r["status"] == "ok"),
            "latents": {"path": self.files.latents, "bytes": tar_bytes, "sha256": tar_sha},
            "meta": {"path": self.files.meta, "bytes": meta_bytes, "sha256": meta_sha},
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
        }
        if not self._create_marker(json_bytes(marker), lost):
            # Another attempt's marker came first (its lock was lost): it, and the files it names, stand.
            existing = read_commit(self.store, self.files.name)
            if existing is None:
                raise OSError(f"{self.store}/{self.files.commit}: exists, and is not a marker of these files")
            self._placed.clear()
            return existing
        self._placed.clear()  # committed: nothing to take back
        return marker

    def _create_marker(self, data: bytes, lost: threading.Event) -> bool:
        """Creates the marker (False if one is there), trying again after a failed try, each time
        after a lease check: a store slow for a moment (on s3 each try is given up within
        `QUICK_S`) does not throw the shard's encoding away. A try that landed but whose answer was
        lost is found by the next one, as a marker that is there. Where every try failed, one may
        still have landed: the files stay (the job's tidy-up removes them if no marker names them)."""
        for _ in range(MARKER_TRIES - 1):
            self._still_held(lost)
            try:
                return self.store.create(self.files.commit, data)
            except Exception as e:
                log.warning("%s/%s: %s; trying again", self.store, self.files.commit, describe_error(e))
                time.sleep(MARKER_RETRY_S)
        self._still_held(lost)
        try:
            return self.store.create(self.files.commit, data)
        except BaseException:
            self._placed.clear()
            raise

    def _publish(self, staged: Path, rel: str, lost: threading.Event) -> str | None:
        """Publishes a staged file under its final name. Where the store creates names only where they
        are free (s3) and this one is taken, it holds what an attempt that never committed left (no
        marker names it, and this attempt holds the shard's lock): that is removed, and the file
        published again."""
        try:
            return self.store.publish(staged, rel)
        except FileExistsError:
            version = self.store.version(rel)
            self._still_held(lost)
            if version is not None:  # (else gone meanwhile)
                self.store.delete(rel, version)  # (only the leftover seen, within `QUICK_S` of the check)
            return self.store.publish(staged, rel)

    def _still_held(self, lost: threading.Event) -> None:
        if lost.is_set():
            raise LockLost(
                f"{self.store}/{self.files.lock}: the shard's commit lock was taken over while this attempt "
                "stalled; it stops before writing more"
            )

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**{name: None for name in SCHEMA.names}, **self.constants, "source": self.source, **row}

    def abort(self) -> None:
        """Drops everything this attempt wrote: its temporaries, and any file it renamed into place
        before the commit failed (a final-named tar without a marker must not pass for data)."""
        try:
            self._tar.close()
        except (OSError, tarfile.TarError):
            pass
        self._raw.close()
        for path in self._tmp:
            path.unlink(missing_ok=True)
        self._unplace()

    def _unplace(self, lost: threading.Event | None = None) -> None:
        """Removes what this attempt published, each only if the name still holds the version it put
        (s3) and while its lock is still its own: once `lost`, the names may be the new holder's
        (an attempt's bytes are its successor's, the same version), left to the job's tidy-up."""
        for rel, version in self._placed:
            if lost is not None and lost.is_set():
                break
            self.store.delete(rel, version)
        self._placed.clear()


def _padded(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
