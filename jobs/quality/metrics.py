"""Image quality metrics for reconstructions: PSNR and SSIM, in plain torch.

Both take float pixels in [0, `data_range`] laid out `... C H W` (any leading dims, e.g.
`T C H W` for a clip). SSIM follows Wang et al. (2004): an 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample) statistics, and only the windows
that fit inside the image ("valid"), averaged over positions and channels per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R BT.601 luma weights, the Y that SSIM was defined on.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; `inf` when `x` equals `y`."""
    _check_shapes(x, y)
    mse = F.mse_loss(x.double(), y.double()).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def luma(rgb: Tensor) -> Tensor:
    """BT.601 luma of `... 3 H W` RGB pixels, as `... 1 H W`."""
    if rgb.shape[-3] != 3:
        raise ValueError(f"expected 3 channels in dim -3, got shape {tuple(rgb.shape)}")
    weights = torch.tensor(LUMA_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * weights).sum(dim=-3, keepdim=True)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """The normalised 1D Gaussian whose outer product is SSIM's 2D window (float64)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity of each image of `... C H W` inputs: a tensor of the leading shape.

    Computed in float64 with a separable Gaussian filter; images must be at least
    `window_size` pixels on each side.
    """
    _check_shapes(x, y)
    if x.ndim < 3:
        raise ValueError(f"expected ... C H W, got shape {tuple(x.shape)}")
    *lead, c, h, w = x.shape
    if min(h, w) < window_size:
        raise ValueError(f"images of {h}x{w} are smaller than the {window_size}x{window_size} SSIM window")
    x = x.double().reshape(-1, c, h, w)
    y = y.double().reshape(-1, c, h, w)
    g = gaussian_window(window_size, sigma).to(x.device)

    def blur(t: Tensor) -> Tensor:  # valid Gaussian filter, each channel on its own
        t = F.conv2d(t, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return F.conv2d(t, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).reshape(lead)


def _check_shapes(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
