"""The GPU paths, on a machine with an NVIDIA GPU (`bash benchmarks/gpu.sh check` runs these with the
CPU tests whose encoders then run on the GPU); skipped elsewhere, and CI has no GPU.

What only a GPU exercises: clips stacked into page-locked memory while the last batch's copy may
still be in flight, uint8 frames made [-1, 1] on the device, the posterior's noise drawn on the host
into page-locked memory and copied without waiting, and latents copied back the same way while the
host writes the batch before (`run.write_behind`)."""

from __future__ import annotations

import pytest
import torch
from conftest import encode_in_process, same_output, small_config

from jobs.dataset.reader import load_sample, read_metadata
from jobs.inputs.video import signed_unit
from jobs.orchestration.worker import device_for_worker
from vae import DiagonalGaussianDistribution

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def test_uint8_pixels_become_the_same_floats_on_the_gpu_as_on_the_cpu():
    """Every uint8 value, made [-1, 1] on the GPU (`signed_unit`), is bit for bit the CPU's float
    path (a division by the number 255 on the GPU is a multiplication by its reciprocal: one bit
    off for 111 of the 256 values, and one of them still after the cast to bfloat16)."""
    values = torch.arange(256, dtype=torch.uint8)
    on_cpu = values.float().div_(255.0).mul_(2.0).sub_(1.0)
    on_gpu = signed_unit(values.cuda()).cpu()
    assert torch.equal(on_gpu, on_cpu) and torch.equal(on_gpu.bfloat16(), on_cpu.bfloat16())


def test_the_noise_drawn_for_a_gpu_posterior_is_the_cpu_generators_draw():
    params = torch.randn(3, 8, 5, 16, 16)
    seeds = (7, 8, 9)
    on_cpu = DiagonalGaussianDistribution(params).sample([torch.Generator().manual_seed(s) for s in seeds])
    gpu = DiagonalGaussianDistribution(params.cuda())
    on_gpu = gpu.sample([torch.Generator().manual_seed(s) for s in seeds])
    torch.cuda.synchronize()
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-6, atol=1e-6)  # (a fused multiply-add at most)


def test_the_job_on_a_gpu_writes_the_same_bytes_with_asynchronous_and_synchronous_copies(demo_shards, tmp_path):
    """Write-behind with page-locked, non-blocking copies against pageable copies that wait, each
    batch written before the next is encoded: batches of 3 and 1 (two shapes per shard, so page-locked
    blocks of both sizes are in use), the posterior's mean and log-variance stored too."""
    assert device_for_worker().type == "cuda"  # where `encode_in_process`'s encoder runs
    roots = []
    for fast in (True, False):
        config = small_config(
            demo_shards,
            tmp_path / f"out-{fast}",
            vae={"dtype": "bfloat16"},
            latents={"store_posterior": True},
            run={"write_behind": fast, "pin_memory": fast, "batch_size": 3},
        )
        roots.append(encode_in_process(config))
    assert [r["status"] for r in same_output(*roots)] == ["ok"] * 12
    for row in read_metadata(roots[0]).to_pylist():
        tensors = load_sample(roots[0], row)
        assert set(tensors) == {"latent", "mean", "logvar"}
        assert torch.isfinite(tensors["latent"]).all() and tensors["latent"].abs().sum() > 0
