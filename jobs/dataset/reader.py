"""Reading a latent dataset: all its metadata, one sample by byte range, or a latent tar in order."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import torch
from safetensors.torch import load as load_safetensors

from jobs.dataset.layout import META_DIR, SCHEMA


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
