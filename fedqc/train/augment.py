"""Batch data augmentation of 2D slice/label pairs, run on the training device.

Spatial: flips on both axes, rotation and isotropic scaling in one resampling through MONAI's
``AffineTransform`` layer (bilinear for images, nearest for labels, zero padding = the z-scored mean).
Intensity: a smooth multiplicative bias field (as MONAI's ``RandBiasField``: exp of a Legendre polynomial),
gamma contrast on the min-max normalised slice (as MONAI's ``AdjustContrast``), intensity scale and
shift, Gaussian noise. Every transform is drawn per sample with its own probability.

The whole batch is transformed with a handful of vectorised tensor operations and no host-device
synchronisation, instead of per-sample MONAI dictionary transforms, so augmentation costs a small fraction
of a training step on a CPU and on a GPU (``benchmarks/bench_training.py`` measures it). Random draws come
from a seeded generator on the device: a seed and a device fix the augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.layers import AffineTransform

from fedqc.core.device import make_generator


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each augmentation (per sample).

    Attributes:
        flip_prob: probability of a flip, for each of the two axes.
        rotate_prob: probability of a rotation in +-``rotate_deg``.
        rotate_deg: largest rotation, degrees.
        scale_prob: probability of an isotropic zoom by a factor in ``scale_range`` (>1 enlarges).
        scale_range: zoom factors.
        bias_field_prob: probability of a multiplicative bias field.
        bias_field_degree: degree of its Legendre polynomial.
        bias_field_coeff: its coefficients are uniform in +-this.
        gamma_prob: probability of a gamma (contrast) change.
        gamma_range: gamma exponents.
        scale_intensity_prob: probability of multiplying intensities by 1 + U(-s, s).
        scale_intensity: s.
        shift_prob: probability of adding U(-t, t) (images are z-scored).
        shift: t.
        noise_prob: probability of additive Gaussian noise.
        noise_std_max: its standard deviation is uniform in [0, this].
    """

    flip_prob: float = 0.5
    rotate_prob: float = 0.3
    rotate_deg: float = 30.0
    scale_prob: float = 0.3
    scale_range: tuple[float, float] = (0.7, 1.4)
    bias_field_prob: float = 0.15
    bias_field_degree: int = 3
    bias_field_coeff: float = 0.15
    gamma_prob: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    scale_intensity_prob: float = 0.15
    scale_intensity: float = 0.25
    shift_prob: float = 0.15
    shift: float = 0.1
    noise_prob: float = 0.15
    noise_std_max: float = 0.1


def legendre_basis(size: tuple[int, int], degree: int) -> torch.Tensor:
    """2D Legendre products P_i(y) P_j(x), i + j <= degree, on a [-1, 1]^2 grid.

    Args:
        size: (H, W).
        degree: the polynomial degree.

    Returns:
        (K, H, W) float32 basis, K = (degree + 1)(degree + 2) / 2.
    """
    ys, xs = (np.polynomial.legendre.legvander(np.linspace(-1, 1, n), degree) for n in size)
    terms = [np.outer(ys[:, i], xs[:, j]) for i in range(degree + 1) for j in range(degree + 1 - i)]
    return torch.as_tensor(np.stack(terms), dtype=torch.float32)


class BatchAugmenter:
    """Augment (N, 1, H, W) images and (N, H, W) labels on their device.

    Args:
        config: probabilities and ranges.
        seed: seed of the augmenter's own generator.
        device: device of the batches (and of the generator).
    """

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.config = config or AugmentConfig()
        self.device = torch.device(device)
        self.generator = make_generator(seed, self.device)
        common = dict(normalized=True, reverse_indexing=False, align_corners=False, padding_mode="zeros")
        self._warp_image = AffineTransform(mode="bilinear", **common)
        self._warp_label = AffineTransform(mode="nearest", **common)
        self._basis: torch.Tensor | None = None

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        u = torch.rand(n, generator=self.generator, device=self.device)
        return low + (high - low) * u

    def _chosen(self, n: int, prob: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=self.device) < prob

    def _affine(self, n: int) -> torch.Tensor:
        """(N, 3, 3) pull-back matrices in normalised coordinates: flips, rotation, 1/zoom."""
        c = self.config
        angle = self._uniform(n, -math.radians(c.rotate_deg), math.radians(c.rotate_deg))
        angle = torch.where(self._chosen(n, c.rotate_prob), angle, torch.zeros_like(angle))
        log_lo, log_hi = math.log(c.scale_range[0]), math.log(c.scale_range[1])
        zoom = torch.exp(self._uniform(n, log_lo, log_hi))  # log-uniform: as likely to shrink as to grow
        zoom = torch.where(self._chosen(n, c.scale_prob), zoom, torch.ones_like(zoom))
        flips = torch.where(self._chosen(2 * n, c.flip_prob), -1.0, 1.0).view(n, 2)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # Square (N, 3, 3) matrices: MONAI would otherwise pad (N, 2, 3) ones with a host-made row, a
        # host-to-device copy that synchronises the CUDA stream every step.
        theta = torch.zeros(n, 3, 3, device=self.device)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flips[:, 0], -sin * flips[:, 0]
        theta[:, 1, 0], theta[:, 1, 1] = sin * flips[:, 1], cos * flips[:, 1]
        theta[:, 2, 2] = 1.0
        return theta

    def _bias_field(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self._basis is None or self._basis.shape[1:] != images.shape[2:]:
            self._basis = legendre_basis(tuple(images.shape[2:]), c.bias_field_degree).to(self.device)
        n, k = images.shape[0], self._basis.shape[0]
        coeff = self._uniform(n * k, -c.bias_field_coeff, c.bias_field_coeff).view(n, k)
        coeff = coeff * self._chosen(n, c.bias_field_prob)[:, None]
        field = torch.exp(torch.einsum("nk,khw->nhw", coeff, self._basis))
        return images * field[:, None]

    def _gamma(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        n = images.shape[0]
        gamma = self._uniform(n, *c.gamma_range)
        gamma = torch.where(self._chosen(n, c.gamma_prob), gamma, torch.ones_like(gamma)).view(n, 1, 1, 1)
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        span = images.amax(dim=(1, 2, 3), keepdim=True) - low + 1e-7
        return ((images - low) / span).pow(gamma) * span + low

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return augmented copies.

        Args:
            images: (N, 1, H, W) float images on ``device``.
            labels: (N, H, W) integer labels on ``device``.

        Returns:
            ``(images, labels)``: float32 (N, 1, H, W) and int64 (N, H, W).
        """
        c = self.config
        n = images.shape[0]
        images = images.float()
        theta = self._affine(n)
        images = self._warp_image(images, theta)
        labels = self._warp_label(labels[:, None].float(), theta)[:, 0].round().long()
        images = self._bias_field(images)
        images = self._gamma(images)
        scale = 1.0 + self._uniform(n, -c.scale_intensity, c.scale_intensity) \
            * self._chosen(n, c.scale_intensity_prob)
        shift = self._uniform(n, -c.shift, c.shift) * self._chosen(n, c.shift_prob)
        images = images * scale.view(n, 1, 1, 1) + shift.view(n, 1, 1, 1)
        std = self._uniform(n, 0.0, c.noise_std_max) * self._chosen(n, c.noise_prob)
        noise = torch.randn(images.shape, generator=self.generator, device=self.device)
        return images + noise * std.view(n, 1, 1, 1), labels
