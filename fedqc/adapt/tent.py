"""TENT (Wang et al., ICLR 2021): minimise the mean softmax entropy of the predictions on a site's
unlabelled pool, updating only the normalisation layers' affine parameters.

As the reference code (DequanWang/tent, ``tent.py``): :func:`configure_model` freezes every
parameter but the affine weight / bias of the normalisation layers and makes batch norm use the
current batch's statistics (``track_running_stats=False``, running statistics dropped), so the
adapted network normalises each test batch (here: a case's slices) by its own statistics;
:func:`collect_params` returns what the optimiser updates; one Adam step (lr 1e-3) per batch.
fedqc adapts on the site's adaptation pool for ``epochs`` passes and scores held-out test
subjects (the same inductive protocol as fedqc's refinement); the reference adapts online on the
test stream. Dropout stays off while adapting (the reference's networks have none).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedqc.adapt.norm_stats import NORM_TYPES, Adapted
from fedqc.models.segmenter import main_output


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy of the softmax over classes (dim 1)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def configure_model(model: nn.Module) -> nn.Module:
    """Freeze everything but the normalisation layers' affine parameters; batch norm on batch statistics."""
    model.eval()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            if getattr(m, "weight", None) is not None:
                m.weight.requires_grad_(True)
            if getattr(m, "bias", None) is not None:
                m.bias.requires_grad_(True)
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def collect_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The affine weight / bias of every normalisation layer, with their names."""
    params, names = [], []
    for module_name, m in model.named_modules():
        if isinstance(m, NORM_TYPES):
            for name, p in m.named_parameters(recurse=False):
                if name in ("weight", "bias"):
                    params.append(p)
                    names.append(f"{module_name}.{name}")
    return params, names


def tent(model: nn.Module, images: np.ndarray, device: torch.device, *, epochs: int = 1, lr: float = 1e-3,
         batch_size: int = 16, seed: int = 0) -> Adapted:
    """A TENT-adapted copy of ``model`` on the pool ``images`` (N, 1, H, W).

    Returns:
        The adapted copy (eval mode, batch norm on batch statistics) and its cost; ``applied=False``
        with the source network when it has no affine normalisation parameter (MONAI's instance
        norm is not affine by default).
    """
    start = time.perf_counter()
    adapted = configure_model(copy.deepcopy(model).to(device))
    params, _ = collect_params(adapted)
    if not params:
        return Adapted(copy.deepcopy(model).to(device).eval(), time.perf_counter() - start, False,
                       "no affine normalisation parameter to adapt (instance norm without affine): "
                       "TENT does not apply; use model.preset unet-bn")
    optimiser = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    x = torch.as_tensor(images, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for first in range(0, x.shape[0], batch_size):
            batch = x[order[first:first + batch_size]].to(device)
            loss = softmax_entropy(main_output(adapted(batch))).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    adapted.requires_grad_(False)
    return Adapted(adapted.eval(), time.perf_counter() - start, True)
