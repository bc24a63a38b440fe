"""Reading a latent dataset (a local directory or s3://): all its metadata, one sample by byte range,
or a latent tar in order."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors

from jobs.dataset.catalog import READERS, Root, committed_markers
from jobs.dataset.layout import SCHEMA
from jobs.dataset.store import open_store


def read_table(root: Root, rel: str) -> pa.Table:
    """One Parquet file of the dataset, in the metadata schema."""
    with open_store(root).open(rel) as f:
        return pq.read_table(f, schema=SCHEMA)


def read_metadata(root: Root) -> pa.Table:
    """The metadata rows of every committed shard of a dataset, as one table (by shard name). A
    `meta/*.parquet` that no commit marker names, or names with other sizes (left by an attempt
    killed while it committed, until a rerun tidies up), is not read: its rows may point into a tar
    of another attempt."""
    store = open_store(root)
    files = [m["meta"]["path"] for m in committed_markers(store)]
    if not files:
        return SCHEMA.empty_table()
    with ThreadPoolExecutor(READERS) as pool:  # in order; on an object store each file is a request or two
        return pa.concat_tables(list(pool.map(lambda rel: read_table(store, rel), files)))


def load_sample(root: Root, row: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Loads one sample's tensors by reading just its byte range of the latent tar."""
    if row["status"] != "ok":
        raise ValueError(f"sample {row['key']} has no latents: {row['error']}")
    return load_safetensors(open_store(root).read_range(row["shard"], row["offset"], row["size"]))


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yields `(key, tensors)` for every sample of a local latent tar, in order.

    Raises:
        tarfile.ReadError: The tar is cut short: it ends without its end-of-archive blocks (Python's
            `tarfile` stops without a word where a cut falls between members or in a header).
    """
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for member in tar:
            if member.name.endswith(".safetensors"):
                f = tar.extractfile(member)
                assert f is not None
                yield member.name.removesuffix(".safetensors"), load_safetensors(f.read())
        raw.seek(tar.offset)  # (where the members ended: two zero blocks follow in a whole tar)
        end = raw.read(2 * tarfile.BLOCKSIZE)
        if len(end) < 2 * tarfile.BLOCKSIZE or any(end):
            raise tarfile.ReadError(f"{path}: cut short after {tar.offset} bytes (no end-of-archive blocks)")
