"""The trainer's side: a DataLoader over a finished run, with workers and ranks, sees every clip once."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import small_config
from torch.utils.data import DataLoader

from jobs import BucketBatchSampler, LatentDataset, collate, latent_stream
from jobs.dataset.layout import ShardFiles
from jobs.dataset.reader import load_sample, read_metadata
from jobs.demo_data import write_demo_dataset
from jobs.orchestration.driver import prepare_output
from jobs.orchestration.settings import check_config, make_plan
from jobs.orchestration.worker import ShardEncoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Three shards of demo videos in two buckets' shapes, up to two clips each, posterior stored."""
    root = tmp_path_factory.mktemp("train")
    shards = write_demo_dataset(root / "data", shards=3, samples_per_shard=4, seed=1)
    video = {"buckets": {"64px": {8: [1.0, 2], 4: [1.0, 3]}}, "clips": "uniform", "max_clips": 2}
    # Stored latents are the posterior's mode (vae.sample off): the exact centre of fresh samples.
    vae = {"sample": False, "checkpoint": str(REPO / "configs" / "demo-vae.safetensors")}  # a trained logvar
    config = small_config(shards, root / "out", video=video, latents={"store_posterior": True}, vae=vae)
    plan = make_plan(config, check_config(config), has_gpus=False)
    prepare_output(plan)
    encoder = ShardEncoder(plan.config, str(plan.root), plan.constants)
    for shard in plan.shards:
        list(encoder.encode_shard(shard))
    return root / "out"


def clips(run_dir):
    return Counter((r["key"], r["clip"]) for r in read_metadata(run_dir).to_pylist() if r["status"] == "ok")


def test_two_ranks_with_two_workers_see_every_clip_once_per_epoch_in_batches_of_one_shape(run_dir):
    dataset = LatentDataset(run_dir)
    expected = clips(run_dir)
    assert len(dataset) == sum(expected.values()) and len(set(dataset.shapes())) >= 2  # several shapes
    orders = []
    for epoch in (0, 1):
        seen: Counter = Counter()
        order = []
        for rank in (0, 1):
            sampler = BucketBatchSampler(dataset, batch_size=3, seed=5, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate)
            batches = list(loader)
            assert len(batches) == len(sampler)
            for batch in batches:
                assert batch["latent"].ndim == 5 and len(batch["key"]) == batch["latent"].shape[0] <= 3
                assert all(list(batch["latent"].shape[1:]) == shape for shape in batch["latent_shape"])
                seen.update(zip(batch["key"], batch["clip"]))
                order += list(zip(batch["key"], batch["clip"]))
        assert seen == expected  # every clip exactly once over the ranks
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled per epoch, deterministically:
    again = BucketBatchSampler(dataset, batch_size=3, seed=5, rank=0, world_size=2)
    assert list(again) == list(BucketBatchSampler(dataset, batch_size=3, seed=5, rank=0, world_size=2))


def test_drop_last_gives_full_batches_and_every_rank_the_same_steps(run_dir):
    dataset = LatentDataset(run_dir)
    samplers = [BucketBatchSampler(dataset, 2, seed=1, rank=r, world_size=3, drop_last=True) for r in range(3)]
    assert len({len(s) for s in samplers}) == 1
    assert all(len(b) == 2 for s in samplers for b in s)
    taken = [i for s in samplers for b in s for i in b]
    assert len(taken) == len(set(taken))
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size = 2\)"):
        BucketBatchSampler(dataset, 2, rank=2, world_size=2)


def test_items_are_the_stored_latents_and_fields(run_dir):
    dataset = LatentDataset(run_dir)
    rows = {(r["key"], r["clip"]): r for r in read_metadata(run_dir).to_pylist() if r["status"] == "ok"}
    for i in range(len(dataset)):
        item = dataset[i]
        row = rows[item["key"], item["clip"]]
        assert torch.equal(item["latent"], load_sample(run_dir, row)["latent"])
        assert (item["bucket"], item["caption"], item["num_frames"]) == (
            row["bucket"],
            row["caption"],
            row["num_frames"],
        )
    bucket = dataset[0]["bucket"]
    only = LatentDataset(run_dir, where=lambda r: r["bucket"] == bucket)
    assert 0 < len(only) < len(dataset) and {only[i]["bucket"] for i in range(len(only))} == {bucket}


def test_a_fresh_posterior_sample_is_scaled_like_the_stored_latent(run_dir):
    dataset = LatentDataset(run_dir, posterior_sample=True, seed=0)
    row = dataset.rows[0]
    tensors = load_sample(run_dir, row)
    draws = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        draws.append(dataset[0]["latent"])
    dataset.set_epoch(3)
    assert torch.equal(dataset[0]["latent"], draws[3])  # the same epoch, the same noise
    assert not torch.equal(draws[0], draws[1])
    # Stored: scale * (mean - shift). A draw: scale * (mean + std * noise - shift); the noise comes out N(0, 1).
    std = row["scale_factor"] * torch.exp(0.5 * tensors["logvar"])
    assert tensors["logvar"].std() > 0.5  # spread out: a wrong std would show
    noise = torch.stack([(d - tensors["latent"]) / std for d in draws])
    assert noise.numel() > 10_000 and abs(noise.mean()) < 0.03 and abs(noise.std() - 1) < 0.03


def test_only_committed_shards_are_read(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    first = LatentDataset(copy).rows[0]
    name = first["shard"].removeprefix("latents/").removesuffix(".tar")
    (copy / ShardFiles(name).commit).unlink()  # as if the job died before committing it
    remaining = LatentDataset(copy)
    assert all(r["shard"] != first["shard"] for r in remaining.rows) and 0 < len(remaining) < len(
        LatentDataset(run_dir)
    )
    streamed = list(latent_stream(copy))
    assert len(streamed) == len(remaining)
    assert {(s["json"]["key"], s["json"]["clip"]) for s in streamed} == {(r["key"], r["clip"]) for r in remaining.rows}


def test_a_posterior_needs_a_run_that_stored_it(tmp_path):
    shards = write_demo_dataset(tmp_path / "data", shards=1, samples_per_shard=1, seed=0)
    config = small_config(shards, tmp_path / "out")
    plan = make_plan(config, check_config(config), has_gpus=False)
    prepare_output(plan)
    list(ShardEncoder(plan.config, str(plan.root), plan.constants).encode_shard(plan.shards[0]))
    with pytest.raises(ValueError, match="stores no posterior"):
        LatentDataset(tmp_path / "out", posterior_sample=True)
