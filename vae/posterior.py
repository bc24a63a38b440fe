"""Diagonal Gaussian posterior returned by the variational encoders."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# Open-Sora and FLUX clamp the log-variance to this range before exponentiating.
LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussianDistribution:
    """A Gaussian with diagonal covariance, parameterised by an encoder's output.

    Args:
        parameters: Tensor whose channel dimension (dim 1) holds the mean followed by the
            log-variance, e.g. `B 2C T H W`.
        deterministic: Treat the distribution as a point mass at its mean.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """Draws `mean + std * eps`.

        Args:
            generator: One generator for the whole batch, or one per batch item. A per-item
                generator makes an item's sample independent of what else is in the batch,
                which is what makes a resumed job produce the same latents as an
                uninterrupted one. The noise is drawn on the generator's device and then
                moved, so CPU generators give the same noise whatever device the model is on.
                For a model on a GPU, CPU noise is drawn into page-locked memory and copied
                without waiting: the host draws it while the encoder's kernels still run, and
                returns before they end.
        """
        per_item = generator is not None and not isinstance(generator, torch.Generator)
        generators = list(generator) if per_item else [generator]  # type: ignore[arg-type]
        if per_item and len(generators) != self.mean.shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {self.mean.shape[0]}")
        device = generators[0].device if generators[0] is not None else torch.device("cpu")
        pinned = device.type == "cpu" and self.mean.is_cuda
        noise = torch.empty(self.mean.shape, dtype=torch.float32, device=device, pin_memory=pinned)
        if per_item:  # each item's noise from its own generator, in place
            for row, g in zip(noise, generators):
                torch.randn(row.shape, generator=g, out=row)
        else:
            torch.randn(noise.shape, generator=generators[0], out=noise)
        # (a copy from page-locked memory does not wait for the stream; PyTorch keeps the page-locked
        # block from reuse until the copy is done)
        noise = noise.to(device=self.mean.device, dtype=self.mean.dtype, non_blocking=pinned)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def latent(
        self,
        scale: Callable[[Tensor], Tensor],
        sample: bool = True,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """What an encoder returns: a sample (or the mode) of the raw latent `z`, then the model's scaling.

        Args:
            scale: Maps `z` to the stored latent (e.g. `scale_factor * (z - shift_factor)`).
            sample: Draw from the posterior (Open-Sora's default) rather than take its mean.
            generator: For the sample, as in `sample`.
        """
        return scale(self.sample(generator) if sample else self.mode())

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL divergence to `other` (a standard normal when None), summed over all but dim 0."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=dims)
        return 0.5 * (
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        ).sum(dim=dims)
