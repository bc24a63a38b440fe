from __future__ import annotations

import math

import pytest
import torch

from vae import DiagonalGaussianDistribution


def test_moments_and_clamp():
    mean = torch.randn(2, 3, 4, 5)
    logvar = torch.full_like(mean, 50.0)
    d = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.equal(d.mode(), mean)
    assert torch.all(d.logvar == 20.0)
    torch.testing.assert_close(d.std, torch.full_like(mean, math.exp(10.0)))


def test_per_item_generators_make_samples_batch_independent():
    params = torch.randn(3, 8, 2, 4, 4)
    d = DiagonalGaussianDistribution(params)
    batch = d.sample([torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = DiagonalGaussianDistribution(params[1:2]).sample([torch.Generator().manual_seed(8)])
    assert torch.equal(batch[1:2], alone)
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        d.sample([torch.Generator(), torch.Generator()])


def test_the_noise_is_each_generators_own_draw():
    """What `sample` adds is exactly `torch.randn` of each generator (latents stored by earlier runs
    of a job stay the ones a resumed run gives)."""
    params = torch.randn(3, 8, 2, 4, 4)
    d = DiagonalGaussianDistribution(params)
    whole = d.sample(torch.Generator().manual_seed(5))
    assert torch.equal(whole, d.mean + d.std * torch.randn(d.mean.shape, generator=torch.Generator().manual_seed(5)))
    batch = d.sample([torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    for i, s in enumerate((7, 8, 9)):
        noise = torch.randn(d.mean.shape[1:], generator=torch.Generator().manual_seed(s))
        assert torch.equal(batch[i], d.mean[i] + d.std[i] * noise)


def test_kl_and_deterministic():
    zeros = torch.zeros(2, 8, 3, 3)
    assert torch.equal(DiagonalGaussianDistribution(zeros).kl(), torch.zeros(2))  # N(0, 1) vs N(0, 1)
    d = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)], dim=1))
    torch.testing.assert_close(d.kl(), torch.full((2,), 0.5 * 4 * 9))
    det = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3), deterministic=True)
    assert torch.equal(det.sample(), det.mean) and torch.equal(det.kl(), torch.zeros(2))
