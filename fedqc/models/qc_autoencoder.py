"""QC module R: the convolutional autoencoder of Galati & Zuluaga (2021) that reconstructs segmentation masks.

It is trained on ground-truth masks only; a mask it cannot reconstruct well is anatomically unusual.
The layer sequence follows the reference (each block Conv -> BatchNorm -> LeakyReLU(0.2) -> Dropout):

    4->32 k4s2, [32->32 k4s2] x (h - 3), 32->32 k3s1, 32->64 k4s2, 64->64 k3s1, 64->128 k4s2,
    128->64 k3s1, 64->32 k3s1, then 32->latent (no norm) onto a 4 x 4 grid,

and the decoder mirrors it with transposed convolutions, ending in 32->4 and a softmax. ``h`` is the number
of halvings before the last layer, planned from the input size: 256 px -> h = 5 (exactly the reference,
whose 10 encoder layers have 6 stride-2 convolutions), 128 -> 4, 64 -> 3, 32 -> 2. When the grid before the
last layer is 8 px, the last layer is the reference's k4s2; when it is 5-7 px (96 px -> 6) it is a valid
(unpadded) k(g-3) s1 convolution, so the latent grid is always 4 x 4. Below h = 3 the first layers become
k3s1 (test sizes only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedqc.core.errors import ConfigError
from fedqc.core.types import NUM_CLASSES

LATENT_GRID_PX = 4
DEFAULT_DROPOUT = 0.1


@dataclass(frozen=True)
class ConvSpec:
    """One encoder convolution; the decoder uses its transpose."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int


def _plan_halvings(in_size_px: int) -> tuple[int, int]:
    """Halvings before the last layer, and the grid size they leave."""
    halvings, size = 0, in_size_px
    while size > 2 * LATENT_GRID_PX and size % 2 == 0:
        size //= 2
        halvings += 1
    if not LATENT_GRID_PX < size <= 2 * LATENT_GRID_PX:
        raise ConfigError("qc.in_size_px", f"{in_size_px} px cannot be reduced to a 4 x 4 latent grid; "
                          "use 2^k * g px with g in 5..8 (e.g. 64, 96, 128, 256)")
    return halvings, size


def encoder_plan(in_size_px: int, latent_channels: int = 100) -> list[ConvSpec]:
    """The encoder's convolutions for a square input of ``in_size_px``.

    Args:
        in_size_px: input height (= width).
        latent_channels: channels of the 4 x 4 latent code.

    Returns:
        The convolutions in order; the last one produces the latent code.

    Raises:
        ConfigError: the size cannot be reduced to a 4 x 4 grid.
    """
    halvings, grid = _plan_halvings(in_size_px)
    core_halvings = min(halvings, 3)  # the reference's 4->32, 32->64 and 64->128 halve
    halve = [i >= 3 - core_halvings for i in range(3)]

    def conv(cin: int, cout: int, down: bool) -> ConvSpec:
        return ConvSpec(cin, cout, 4, 2, 1) if down else ConvSpec(cin, cout, 3, 1, 1)

    plan = [conv(NUM_CLASSES, 32, halve[0])]
    plan += [conv(32, 32, True) for _ in range(halvings - 3)]
    plan += [conv(32, 32, False), conv(32, 64, halve[1]), conv(64, 64, False), conv(64, 128, halve[2]),
             conv(128, 64, False), conv(64, 32, False)]
    if grid == 2 * LATENT_GRID_PX:
        plan.append(ConvSpec(32, latent_channels, 4, 2, 1))
    else:
        plan.append(ConvSpec(32, latent_channels, grid - LATENT_GRID_PX + 1, 1, 0))
    return plan


def _block(layer: nn.Module, channels: int, dropout: float) -> list[nn.Module]:
    block = [layer, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2, inplace=True)]
    return block + ([nn.Dropout(dropout)] if dropout > 0 else [])


class QCAutoencoder(nn.Module):
    """Convolutional autoencoder mapping a (N, 4, H, W) mask (one-hot or soft) to (N, 4, H, W) probabilities.

    Args:
        in_size_px: input height (= width).
        latent_channels: channels of the 4 x 4 latent code (100 in the reference).
        dropout: dropout after every normalised block (0.5 in the reference).
    """

    def __init__(self, in_size_px: int, latent_channels: int = 100, dropout: float = DEFAULT_DROPOUT):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("qc.dropout", f"must be in [0, 1), got {dropout}")
        self.in_size_px = in_size_px
        plan = encoder_plan(in_size_px, latent_channels)
        enc: list[nn.Module] = []
        for spec in plan[:-1]:
            conv = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding,
                             bias=False)
            enc += _block(conv, spec.out_channels, dropout)
        last = plan[-1]
        enc.append(nn.Conv2d(last.in_channels, last.out_channels, last.kernel, last.stride, last.padding))
        dec: list[nn.Module] = []
        for spec in reversed(plan[1:]):
            deconv = nn.ConvTranspose2d(spec.out_channels, spec.in_channels, spec.kernel, spec.stride,
                                        spec.padding, bias=False)
            dec += _block(deconv, spec.in_channels, dropout)
        first = plan[0]
        dec.append(nn.ConvTranspose2d(first.out_channels, first.in_channels, first.kernel, first.stride,
                                      first.padding))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """Reconstruct masks.

        Args:
            masks: (N, 4, H, W) one-hot or probability maps.

        Returns:
            (N, 4, H, W) reconstructed class probabilities (softmax over channels).
        """
        return torch.softmax(self.decoder(self.encoder(masks)), dim=1)


def build_qc_autoencoder(in_size_px: int, latent_channels: int = 100,
                         dropout: float = DEFAULT_DROPOUT) -> QCAutoencoder:
    """Build the QC autoencoder for square inputs of ``in_size_px``.

    Args:
        in_size_px: input height (= width); 2^k * g with g in 5..8 (64, 96, 128, 256, ...).
        latent_channels: channels of the 4 x 4 latent code.
        dropout: dropout probability after each normalised block; the reference's 0.5 blurs
            reconstructions (see docs/TRAINING.md), so the default is lower.

    Returns:
        The autoencoder (CPU, float32, training mode).
    """
    return QCAutoencoder(in_size_px, latent_channels, dropout)
