"""AdaBN: re-estimate the batch-norm statistics of a segmenter on a site's unlabelled pool.

Only the running mean / variance of batch-norm layers change; weights, biases and every other
layer stay as they are. Instance norm normalises each image by its own statistics and keeps no
running statistics (MONAI's default, ``track_running_stats=False``), so on an instance-norm
network AdaBN is a no-op: :func:`adabn` says so in :attr:`Adapted.note` and returns the network
unchanged. The ``unet-bn`` preset (:mod:`fedqc.models.segmenter`) is the batch-norm segmenter on
which the BN-based peers apply.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass
class Adapted:
    """A peer's adapted network for one site and what it cost."""

    model: nn.Module
    seconds: float
    applied: bool  # False: the method does not apply to this network (``note`` says why)
    note: str = ""


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers of ``model`` (instance norm excluded)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def tracked_norms(model: nn.Module) -> list[nn.Module]:
    """Normalisation layers that keep running statistics (the ones AdaBN re-estimates)."""
    return [m for m in model.modules() if isinstance(m, (_BatchNorm, _InstanceNorm)) and m.track_running_stats]


def pool_slices(cases) -> np.ndarray:
    """All slices of a site's pool as one (N, 1, H, W) float32 stack."""
    if not cases:
        return np.zeros((0, 1, 1, 1), np.float32)
    return np.concatenate([c.images for c in cases])[:, None].astype(np.float32, copy=False)


@torch.no_grad()
def adabn(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 16) -> Adapted:
    """A copy of ``model`` whose batch-norm running statistics are those of ``images``.

    Args:
        model: the source segmenter (left unchanged).
        images: (N, 1, H, W) unlabelled slices of the site's pool.
        device: where to compute.
        batch_size: slices per forward pass (the running statistics are a cumulative average over
            the passes, ``momentum=None``, so every slice counts the same).

    Returns:
        The adapted copy (eval mode) with its cost; ``applied=False`` for a network without
        tracked normalisation statistics (instance norm), returned unchanged.
    """
    start = time.perf_counter()
    adapted = copy.deepcopy(model).to(device).eval()
    norms = tracked_norms(adapted)
    if not norms:
        return Adapted(adapted, time.perf_counter() - start, False,
                       "no normalisation layer keeps running statistics (instance norm normalises each "
                       "image by its own): AdaBN is a no-op; use model.preset unet-bn")
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pool's batches
        m.train()  # only the norm layers: dropout stays off
    x = torch.as_tensor(images, dtype=torch.float32)
    for first in range(0, x.shape[0], batch_size):
        adapted(x[first:first + batch_size].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    adapted.eval()
    return Adapted(adapted, time.perf_counter() - start, True)
