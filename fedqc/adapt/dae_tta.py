"""DAE-TTA (Karani et al., MedIA 2021): a shallow image normaliser in front of the frozen segmenter,
adapted per site so that the prediction agrees with the denoising autoencoder's output of it.

As the reference code (neerakara/test-time-adaptable-neural-networks-for-domain-generalization,
``model_zoo.net2D_i2i``): ``hidden_layers`` 3x3 convolutions of 16 filters, each followed by a
Gaussian (rbf) activation ``exp(-x^2 / scale^2)`` with a learnable per-channel scale (0.2 at
start), then a 3x3 convolution to one channel, added to the image (``output = image + delta``).
The last convolution starts at zero, so the normaliser starts as the identity and the adapted
network starts as M. The loss is the Dice loss (``monai.losses.DiceLoss``, foreground classes)
between the prediction's softmax and R's reconstruction of the hard prediction, held fixed
(no gradient); the normaliser with the best agreement on the pool (evaluated before adapting and
after every epoch) is kept, as the reference keeps its best-agreement checkpoint. fedqc's QC
autoencoder R plays the DAE; the reference's atlas gating is not implemented (docs/RESULTS.md).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from fedqc.adapt.norm_stats import Adapted
from fedqc.core.types import NUM_CLASSES
from fedqc.models.segmenter import main_output


class ImageNormaliser(nn.Module):
    """Karani et al.'s normaliser: residual, identity at initialisation."""

    def __init__(self, hidden_layers: int = 2, filters: int = 16, kernel_size: int = 3, init_scale: float = 0.2):
        super().__init__()
        pad = kernel_size // 2
        self.hidden = nn.ModuleList(
            nn.Conv2d(1 if i == 0 else filters, filters, kernel_size, padding=pad) for i in range(hidden_layers))
        self.scales = nn.ParameterList(nn.Parameter(torch.full((1, filters, 1, 1), init_scale))
                                       for _ in range(hidden_layers))
        self.delta = nn.Conv2d(filters, 1, kernel_size, padding=pad)
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = images
        for conv, scale in zip(self.hidden, self.scales):
            out = torch.exp(-conv(out) ** 2 / scale ** 2)
        return images + self.delta(out)


class NormalisedSegmenter(nn.Module):
    """The normaliser in front of a (frozen) segmenter."""

    def __init__(self, normaliser: nn.Module, segmenter: nn.Module):
        super().__init__()
        self.normaliser = normaliser
        self.segmenter = segmenter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter(self.normaliser(images))


def _dae_target(autoencoder: nn.Module, probs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        onehot = F.one_hot(probs.argmax(1), NUM_CLASSES).permute(0, 3, 1, 2).float()
        return autoencoder(onehot).float()


@torch.no_grad()
def _agreement(network: nn.Module, autoencoder: nn.Module, x: torch.Tensor, device: torch.device,
               loss_fn: DiceLoss, batch_size: int) -> float:
    """Mean Dice between the prediction and R's reconstruction of it over the pool (1 - loss)."""
    losses = []
    for first in range(0, x.shape[0], batch_size):
        probs = main_output(network(x[first:first + batch_size].to(device))).softmax(1)
        losses.append(float(loss_fn(probs, _dae_target(autoencoder, probs))) * probs.shape[0])
    return 1.0 - sum(losses) / max(x.shape[0], 1)


def dae_tta(model: nn.Module, autoencoder: nn.Module, images: np.ndarray, device: torch.device, *,
            epochs: int = 5, lr: float = 1e-3, batch_size: int = 16, seed: int = 0) -> Adapted:
    """The normaliser adapted on the pool ``images`` (N, 1, H, W) in front of a frozen copy of ``model``.

    Returns:
        A :class:`NormalisedSegmenter` (eval mode) with the best-agreement normaliser, and its cost.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    segmenter = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    autoencoder = autoencoder.eval()
    network = NormalisedSegmenter(ImageNormaliser().to(device), segmenter)
    loss_fn = DiceLoss(include_background=False, reduction="mean")
    optimiser = torch.optim.Adam(network.normaliser.parameters(), lr=lr)
    x = torch.as_tensor(images, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    best = _agreement(network, autoencoder, x, device, loss_fn, batch_size)
    best_state = copy.deepcopy(network.normaliser.state_dict())
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for first in range(0, x.shape[0], batch_size):
            batch = x[order[first:first + batch_size]].to(device)
            probs = main_output(network(batch)).softmax(1)
            loss = loss_fn(probs, _dae_target(autoencoder, probs))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        score = _agreement(network, autoencoder, x, device, loss_fn, batch_size)
        if score > best:
            best, best_state = score, copy.deepcopy(network.normaliser.state_dict())
    network.normaliser.load_state_dict(best_state)
    network.requires_grad_(False)
    return Adapted(network.eval(), time.perf_counter() - start, True, f"pool agreement {best:.3f}")
