"""Every on-disk name of a latent dataset, and the schema of its metadata.

Nothing else in the project spells these names: the writer, the readers, the job and the
tools that inspect an output directory all ask this module.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

# Bumped whenever the bytes written for the same inputs and settings change.
FORMAT_VERSION = 2  # 2: clips (several per video, sampled frames, buckets) and their columns

LATENTS_DIR = "latents"
META_DIR = "meta"
COMMITS_DIR = "_commits"
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"  # figures of the last run (the driver writes it; `jobs.status` reads it)
LOCK_FILE = ".lock"
TMP_SUFFIX = ".tmp"  # hidden temporaries: `.<final name>.<random>.tmp` beside the final file
DATA_DIRS = (LATENTS_DIR, META_DIR, COMMITS_DIR)
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def is_temporary(path: Path) -> bool:
    """Whether `path` is the temporary of a write (`jobs.dataset.atomic.temp_path` names them)."""
    return _TEMPORARY.match(path.name) is not None


# Key of the rows that record shard-level read problems (a truncated tar, a missing file); their
# `index` is negative, so they sort after the samples.
SHARD_ROW_KEY = "__shard__"

# One row per clip (or per input sample that gave none: an error). Columns after `fingerprint`
# describe the VAE and are the same for every row of a job; they are repeated so that any single
# file is self-describing.
SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # webdataset key of the input sample
        ("source", pa.string()),  # input shard (path or URL)
        ("index", pa.int32()),  # position of the sample in its input shard
        ("clip", pa.int32()),  # clip number within the sample (0 unless several clips per video)
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
        ("fps", pa.float64()),  # average frame rate of the source video (0 for an image)
        ("frame_stride", pa.int32()),  # Open-Sora's frame interval (encoded frames are at fps / frame_stride)
        ("frame_indices", pa.list_(pa.int32())),  # the source frames encoded (on the fps time grid)
        ("clip_start", pa.float64()),  # seconds from the first frame to the clip's first
        ("bucket", pa.string()),  # "resolution/aspect/num_frames" with video.buckets, else null
        ("caption", pa.string()),
        ("meta", pa.string()),  # the sample's `.json` member, verbatim
        ("src_width", pa.int32()),
        ("src_height", pa.int32()),
        ("src_num_frames", pa.int32()),  # frames the container holds (on the fps time grid)
        ("src_rotation", pa.int32()),  # degrees the stored frames were turned for display
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

    @property
    def lock(self) -> str:
        """Held by the attempt committing the shard (an empty file, kept: it is only ever locked)."""
        folder, _, base = f"{COMMITS_DIR}/{self.name}".rpartition("/")
        return f"{folder}/.{base}.lock"


_UNSAFE_PART = re.compile(r"^\.{1,2}$|[\x00-\x1f\x7f\\]")
# webdataset skips every member under a first folder named `__<anything>__` (its metadata).
_SKIPPED_FOLDER = re.compile(r"^__[^/]*__/")
MAX_MEMBER_STEM = 200  # bytes: a tar member name, and a file name when extracted, stay well under 255


def member_stem(key: str, clip: int | None = None) -> str:
    """The name of a sample's members in a latent tar (`<stem>.safetensors`, `<stem>.json`).

    With several clips per video (`clip` given) every stem ends in `_c<clip>` (`_c007`): a
    fixed-width suffix on every clip keeps stems unique, and no dot keeps webdataset's keys whole.

    A key that is a safe relative path is its own stem. Any other (absolute, `..` or empty
    parts, control characters or backslashes, too long, a dot in its last part, a first folder
    webdataset skips) is cleaned and given a hash of the key (`<cleaned>~<16 hex>`), so that no
    extraction can leave the destination folder and webdataset reads every stem whole: it takes
    the last part of a member name up to its first dot as the key, so that part of a stem holds
    no dot, even where the cut to `MAX_MEMBER_STEM` bytes lands inside a dotted folder name
    (dots in folders are fine). The row and the sidecar keep the original key.

    Distinct keys can still share a stem (a key spelled like another's cleaned stem, or a hash
    collision); `ShardWriter.add` refuses the second sample of a shard whose stem is taken.
    """
    if clip is not None:
        return f"{member_stem(key)}_c{clip:03d}"
    parts = key.split("/")
    if (
        len(key.encode()) <= MAX_MEMBER_STEM
        and all(p and not _UNSAFE_PART.search(p) for p in parts)
        and "." not in parts[-1]
        and not _SKIPPED_FOLDER.match(key)
    ):
        return key
    cleaned = "/".join(_UNSAFE_PART.sub("_", p) or "_" for p in parts if p != "") or "_"
    digest = hashlib.sha256(key.encode("utf-8", "backslashreplace")).hexdigest()[:16]
    head = cleaned.encode()[: MAX_MEMBER_STEM - 17].decode("utf-8", "ignore")
    folder, slash, last = head.rpartition("/")  # after the cut: it may end inside a folder's name
    head = folder + slash + last.replace(".", "_")
    if _SKIPPED_FOLDER.match(head):
        head = head[1:]
    return f"{head}~{digest}"
