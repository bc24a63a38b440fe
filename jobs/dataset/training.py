"""The training side: a PyTorch dataset over an output directory, and batches of one latent shape.

    from torch.utils.data import DataLoader
    from jobs import BucketBatchSampler, LatentDataset

    dataset = LatentDataset("out/latents", where=lambda row: row["bucket"] == "256px/16:9/33")
    sampler = BucketBatchSampler(dataset, batch_size=8, seed=0, rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4, collate_fn=collate)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:          # batch["latent"]: B C T H W, one shape per batch
            ...

Only committed shards are read (those whose commit marker carries the job's fingerprint; the
marker names the Parquet file): a shard being written, or left half-written by a crash, is never
seen. Each item is read by seeking to its byte range in the latent tar (one open file per tar
and worker process; on s3://, a ranged read). `latent_stream` reads the same tars in order with
plain webdataset stages.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors
from torch.utils.data import Dataset, Sampler

from jobs.dataset.catalog import Root, committed_markers, read_job
from jobs.dataset.reader import read_table
from jobs.dataset.store import open_store

# The row fields each item carries besides its tensors.
ITEM_FIELDS = (
    "key",
    "clip",
    "caption",
    "meta",
    "source",
    "index",
    "num_frames",
    "height",
    "width",
    "fps",
    "frame_stride",
    "bucket",
    "latent_shape",
)


class LatentDataset(Dataset[dict[str, Any]]):
    """The ok clips of a latent dataset, in shard order, as a map-style dataset.

    Args:
        root: The output directory (DIR), local or `s3://bucket/prefix`.
        where: Keep only the rows for which this returns true (a row is a dict of the Parquet
            columns: filter on `bucket`, `caption`, `num_frames`, ...).
        posterior_sample: Return a fresh posterior sample from the stored `mean` and `logvar`
            (scaled like the stored latent), instead of the stored latent; needs a job run with
            `latents.store_posterior`. Its noise depends on `seed`, the epoch and the clip only.
        seed: Seed of that noise.

    Items are dicts: `latent` (C T H W, scaled as the trainer expects) and the row's fields
    (`key`, `clip`, `caption`, `meta`, `bucket`, shapes, ...).

    Raises:
        OSError: A commit marker could not be read (an I/O or network error): the dataset is not
            opened without that shard.
    """

    def __init__(
        self,
        root: Root,
        where: Callable[[dict[str, Any]], bool] | None = None,
        posterior_sample: bool = False,
        seed: int = 0,
    ) -> None:
        self.store = open_store(root)
        job = read_job(self.store)
        self.rows: list[dict[str, Any]] = []
        for marker in committed_markers(self.store, job.fingerprint):
            table = read_table(self.store, marker["meta"]["path"])
            self.rows += [r for r in table.to_pylist() if r["status"] == "ok" and (where is None or where(r))]
        if posterior_sample and not job.settings["latents"]["store_posterior"]:
            raise ValueError(f"{root} stores no posterior (latents.store_posterior was off): cannot sample one")
        self.posterior_sample = posterior_sample
        self.seed = seed
        self.epoch = 0
        self._files: dict[str, BinaryIO] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """The epoch, for the noise of posterior samples (a `BucketBatchSampler` sets its own)."""
        self.epoch = epoch

    def shapes(self) -> list[tuple[int, ...]]:
        """Each item's latent shape, without reading any latent."""
        return [tuple(r["latent_shape"]) for r in self.rows]

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        tensors = load_safetensors(self._read(row["shard"], row["offset"], row["size"]))
        item = {name: row[name] for name in ITEM_FIELDS}
        if self.posterior_sample:
            mean, logvar = tensors["mean"].float(), tensors["logvar"].float()
            noise = torch.randn(mean.shape, generator=self._generator(row))
            z = mean + torch.exp(0.5 * logvar) * noise
            item["latent"] = (row["scale_factor"] * (z - row["shift_factor"])).to(tensors["latent"].dtype)
        else:
            item["latent"] = tensors["latent"]
        return item

    def _generator(self, row: dict[str, Any]) -> torch.Generator:
        name = f"{self.seed}:{self.epoch}:{row['key']}:{row['clip']}"
        digest = hashlib.sha256(name.encode("utf-8", "backslashreplace")).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    def _read(self, shard: str, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:  # a DataLoader worker: files opened before the fork are not shared
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = self.store.open(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.store}/{shard}: {size} bytes expected at offset {offset}, {len(data)} read")
        return data

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}  # open files do not travel to worker processes
        return state


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose latents have one shape, every index once per epoch over all ranks.

    Each shape's indices are shuffled (with `shuffle`) and cut into batches of `batch_size` (the
    last one smaller, or dropped with `drop_last`); the batches of all shapes are shuffled
    together and dealt to the ranks in turn (rank r takes batches r, r + world_size, ...). With
    `drop_last` the batches are also cut to a multiple of `world_size`, so every rank takes the
    same number of steps. The order depends only on `seed` and the epoch.
    """

    def __init__(
        self,
        dataset: LatentDataset | Sequence[tuple[int, ...]],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}); got {rank}")
        self.dataset = dataset
        shapes = dataset.shapes() if isinstance(dataset, LatentDataset) else list(dataset)
        self.groups: dict[tuple[int, ...], list[int]] = {}
        for i, shape in enumerate(shapes):
            self.groups.setdefault(tuple(shape), []).append(i)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffles differently for each epoch (and seeds the dataset's posterior noise with it)."""
        self.epoch = epoch
        if isinstance(self.dataset, LatentDataset):
            self.dataset.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for indices in self.groups.values():
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._batches()[self.rank :: self.world_size])


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of items of one shape: their tensors stacked (`latent`: B C T H W), the rest as lists."""
    batch: dict[str, Any] = {}
    for name in items[0]:
        values = [item[name] for item in items]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def latent_stream(root: Root) -> wds.DataPipeline:
    """The committed latent tars of `root` (local or s3://) in order, as a webdataset pipeline of
    dicts with `latent` (and `mean`/`logvar` when stored), `json` (the sidecar) and `__key__`.

    Raises:
        OSError: A commit marker could not be read (the stream never starts without that shard).
    """
    store = open_store(root)
    rels = [m["latents"]["path"] for m in committed_markers(store, read_job(store).fingerprint)]

    def opened(urls: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for sample in urls:
            yield {**sample, "stream": store.open(sample["url"])}

    return wds.DataPipeline(
        wds.SimpleShardList(rels),
        opened,
        wds.tariterators.tar_file_expander,
        wds.tariterators.group_by_keys,
        wds.map(_decode_member),
    )


def _decode_member(sample: dict[str, Any]) -> dict[str, Any]:
    out = {"__key__": sample["__key__"], "json": json.loads(sample["json"])}
    out.update(load_safetensors(sample["safetensors"]))
    return out
