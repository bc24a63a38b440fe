from __future__ import annotations

import math

import pytest
import torch

from jobs.quality.metrics import gaussian_window, luma, psnr, ssim


def _image(seed: int = 0, shape=(3, 32, 40)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_images():
    x = _image()
    assert psnr(x, x) == math.inf
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_known_errors():
    x = torch.full((3, 16, 16), 0.5, dtype=torch.float64)
    assert psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-6)  # MSE 0.01
    assert psnr(x, x + 0.01) == pytest.approx(40.0, abs=1e-4)
    assert psnr(x * 255, (x + 0.1) * 255, data_range=255) == pytest.approx(20.0, abs=1e-6)
    # Gaussian noise of std 0.05 (no clipping around 0.5): MSE ~ 0.0025, PSNR ~ 26.02 dB.
    noise = torch.randn((3, 256, 256), generator=torch.Generator().manual_seed(1)) * 0.05
    assert psnr(torch.full_like(noise, 0.5), 0.5 + noise) == pytest.approx(26.02, abs=0.05)


def test_ssim_of_constant_images_is_the_luminance_term():
    # Flat images have no variance, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) everywhere.
    a, b, c1 = 0.3, 0.6, 0.01**2
    x, y = torch.full((1, 20, 20), a), torch.full((1, 20, 20), b)
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_matches_a_direct_windowed_computation():
    x, y = _image(0, (1, 13, 14)), _image(1, (1, 13, 14))
    window = torch.outer(gaussian_window(), gaussian_window())
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(13 - 10):
        for j in range(14 - 10):
            px, py = x[0, i : i + 11, j : j + 11], y[0, i : i + 11, j : j + 11]
            mx, my = (window * px).sum(), (window * py).sum()
            vx, vy = (window * (px - mx) ** 2).sum(), (window * (py - my) ** 2).sum()
            cov = (window * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert ssim(x, y).item() == pytest.approx(torch.stack(values).mean().item(), rel=1e-9)


def test_ssim_orders_degradations_and_keeps_leading_dims():
    x = _image(0, (4, 3, 32, 32)) * 0.5 + 0.25  # T C H W
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    slight, strong = ssim(x, x + 0.02 * noise), ssim(x, x + 0.2 * noise)
    assert slight.shape == (4,)
    assert (slight > 0.9).all() and (strong < slight).all()
    assert torch.allclose(ssim(x, x + 0.2 * noise), ssim(x + 0.2 * noise, x))  # symmetric


def test_luma_and_input_checks():
    rgb = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 2, 2)
    assert luma(rgb).shape == (1, 2, 2) and luma(rgb)[0, 0, 0].item() == pytest.approx(0.299)
    assert luma(torch.ones(2, 3, 4, 4)).allclose(torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(3, 4, 4), torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
