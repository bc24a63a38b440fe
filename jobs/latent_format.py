"""The on-disk contract of a precomputed latent dataset: this module writes it and reads it.

    DIR/job.json                       resolved config, fingerprint, VAE identity
    DIR/latents/<name>.tar             per input shard: `<key>.safetensors` + `<key>.json` per ok sample
    DIR/meta/<name>.parquet            per input shard: one row per input sample (ok or error)
    DIR/_commits/<name>.json           commit marker, written last
    DIR/manifest.json                  written when every shard is committed

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
import os
import socket
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

LATENTS_DIR = "latents"
META_DIR = "meta"
COMMITS_DIR = "_commits"
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
TMP_SUFFIX = ".tmp"

# One row per input sample. Columns after `fingerprint` describe the VAE and are the same
# for every row of a job; they are repeated so that any single file is self-describing.
SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # webdataset key of the input sample
        ("source", pa.string()),  # input shard (path or URL)
        ("index", pa.int32()),  # position of the sample in its input shard
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # reason, for status "error"
        ("shard", pa.string()),  # latent tar, relative to DIR
        ("offset", pa.int64()),  # byte offset of the `.safetensors` member's data in `shard`
        ("size", pa.int64()),  # its length in bytes
        ("latent_shape", pa.list_(pa.int32())),  # C T H W
        ("latent_dtype", pa.string()),
        ("num_frames", pa.int32()),  # frames encoded
        ("height", pa.int32()),  # size encoded
        ("width", pa.int32()),
        ("fps", pa.float64()),  # frame rate of the source video (and of the encoded frames)
        ("caption", pa.string()),
        ("meta", pa.string()),  # the sample's `.json` member, verbatim
        ("src_width", pa.int32()),
        ("src_height", pa.int32()),
        ("src_num_frames", pa.int32()),  # as reported by the container (0 = unknown)
        ("src_duration", pa.float64()),
        ("codec", pa.string()),
        ("fingerprint", pa.string()),  # job fingerprint (settings that determine the bytes)
        ("vae", pa.string()),  # preset name
        ("vae_checkpoint", pa.string()),  # file name of the weights ("" = random init)
        ("vae_checkpoint_sha256", pa.string()),
        ("vae_dtype", pa.string()),  # compute dtype
        ("tiling", pa.string()),  # how the encode was split ("untiled", chunks, tiles; see vae/tiling.py)
        ("scale_factor", pa.float64()),
        ("shift_factor", pa.float64()),
        ("scaling", pa.string()),  # the formula relating stored latents to the raw VAE latent
    ]
)


@dataclass(frozen=True)
class ShardFiles:
    """Paths of one output shard, relative to the dataset root."""

    name: str

    @property
    def latents(self) -> str:
        return f"{LATENTS_DIR}/{self.name}.tar"

    @property
    def meta(self) -> str:
        return f"{META_DIR}/{self.name}.parquet"

    @property
    def commit(self) -> str:
        return f"{COMMITS_DIR}/{self.name}.json"


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
        root: Dataset root (DIR).
        name: Output name of the shard (see `jobs.shards.Shard.name`).
        source: The input shard, recorded in every row.
        constants: Column values shared by every row (fingerprint and VAE identity).
    """

    def __init__(self, root: str | Path, name: str, source: str, constants: dict[str, Any]) -> None:
        self.root = Path(root)
        self.files = ShardFiles(name)
        self.source = source
        self.constants = constants
        self.rows: list[dict[str, Any]] = []
        self._tmp: list[Path] = []
        self._tar_path = self._temp(self.files.latents)
        self._raw = open(self._tar_path, "wb")
        self._hash = _HashingWriter(self._raw)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.PAX_FORMAT)

    def _temp(self, rel: str) -> Path:
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
        self._tmp.append(tmp)
        return tmp

    def _add_member(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self._tar.addfile(info, io.BytesIO(data))
        # After addfile the archive offset sits at the end of the 512-byte-padded data.
        return self._tar.offset - _padded(len(data))

    def add(self, key: str, index: int, tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> None:
        """Adds an encoded sample: its tensors as `<key>.safetensors`, a JSON sidecar, a row."""
        latent = tensors["latent"]
        blob = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"key": key})
        offset = self._add_member(f"{key}.safetensors", blob)
        row = {
            **fields,
            "key": key,
            "index": index,
            "status": "ok",
            "shard": self.files.latents,
            "offset": offset,
            "size": len(blob),
            "latent_shape": list(latent.shape),
            "latent_dtype": str(latent.dtype).removeprefix("torch."),
        }
        sidecar = {k: row.get(k) for k in ("key", "caption", "num_frames", "height", "width", "fps", "latent_shape")}
        sidecar["meta"] = json.loads(fields["meta"]) if fields.get("meta") else None
        self._add_member(f"{key}.json", json.dumps(sidecar, sort_keys=True).encode())
        self.rows.append(row)

    def add_error(self, key: str, index: int, reason: str, fields: dict[str, Any] | None = None) -> None:
        """Records a sample that could not be encoded: a row with its reason, nothing in the tar."""
        self.rows.append({**(fields or {}), "key": key, "index": index, "status": "error", "error": reason})

    def commit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Closes the tar, then renames tar, Parquet and commit marker into place, in that order."""
        self._tar.close()
        _sync_close(self._raw)
        tar_sha, tar_bytes = self._hash.sha256.hexdigest(), self._hash.nbytes
        os.replace(self._tar_path, self.root / self.files.latents)

        # Rows in input order; shard-level problems (negative index) at the end.
        self.rows.sort(key=lambda r: (r["index"] < 0, abs(r["index"])))
        table = pa.Table.from_pylist([self._row(r) for r in self.rows], schema=SCHEMA)
        meta_tmp = self._temp(self.files.meta)
        pq.write_table(table, meta_tmp, compression="zstd")
        meta_sha, meta_bytes = _sha256_file(meta_tmp)
        os.replace(meta_tmp, self.root / self.files.meta)

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
            **(extra or {}),
        }
        write_json_atomic(self.root / self.files.commit, marker)
        for directory in {p.parent for p in self._tmp}:
            _sync_dir(directory)
        return marker

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**{name: None for name in SCHEMA.names}, **self.constants, "source": self.source, **row}

    def abort(self) -> None:
        """Drops everything written so far (the temporaries; nothing final was touched)."""
        try:
            self._tar.close()
        except (OSError, tarfile.TarError):
            pass
        self._raw.close()
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)


def _padded(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _sync_close(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> tuple[str, int]:
    digest, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
            n += len(block)
    return digest.hexdigest(), n


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Writes JSON to a temporary sibling, fsyncs it, and renames it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_commit(root: str | Path, name: str) -> dict[str, Any] | None:
    """The commit marker of a shard, or None if the shard is not (validly) committed."""
    root = Path(root)
    path = root / ShardFiles(name).commit
    try:
        marker = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for part in ("latents", "meta"):
        f = root / marker[part]["path"]
        if not f.is_file() or f.stat().st_size != marker[part]["bytes"]:
            return None
    return marker


def remove_temporaries(root: str | Path) -> int:
    """Deletes leftovers of interrupted writes; returns how many were removed."""
    removed = 0
    for sub in (LATENTS_DIR, META_DIR, COMMITS_DIR, ""):
        base = Path(root) / sub
        pattern = f".*{TMP_SUFFIX}"
        for tmp in base.rglob(pattern) if sub else base.glob(pattern):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def read_metadata(root: str | Path) -> pa.Table:
    """All metadata rows of a dataset as one table."""
    return pads.dataset(Path(root) / META_DIR, format="parquet", schema=SCHEMA).to_table()


def load_sample(root: str | Path, row: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Loads one sample's tensors by seeking straight to its byte range in the latent tar."""
    if row["status"] != "ok":
        raise ValueError(f"sample {row['key']} has no latents: {row['error']}")
    with open(Path(root) / row["shard"], "rb") as f:
        f.seek(row["offset"])
        return load_safetensors(f.read(row["size"]))


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yields `(key, tensors)` for every sample of a latent tar, in order."""
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.name.endswith(".safetensors"):
                f = tar.extractfile(member)
                assert f is not None
                yield member.name.removesuffix(".safetensors"), load_safetensors(f.read())
