"""Realistic segmentation failures made from ground-truth masks: the corrective QC module's inputs.

The paper's QC autoencoder learns to reproduce ground-truth masks (``qc.autoencoder: plain``). A
corrective one learns to *repair* what segmenters get wrong (``corrective``): it sees a
ground-truth mask corrupted by the failures below and is trained to output the clean mask, so
that on a bad prediction its output is closer to the truth than the prediction (a better
pseudo-label for Eq. 2) and the agreement pDC drops where the prediction is implausible.

Failures, each drawn per mask with its own probability (Karani et al. 2021's denoising
autoencoder for the boxes, the rest from the failure modes seen at shifted sites):

* boxes: up to ``max_boxes`` boxes whose labels are erased or replaced by those of another box;
* a missing RV (label 3 erased) or a partial one (erased on one side of a random line);
* false fragments: a disc of a random structure somewhere in the image;
* dilation or erosion of one structure by 1-2 pixels;
* a shift and small rotation, and a smooth elastic warp (nearest-neighbour resampling).

Everything runs on the masks' device with the caller's generator (reproducible per epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedqc.core.types import NUM_CLASSES

RV = 3


@dataclass(frozen=True)
class CorruptionConfig:
    """Probabilities and sizes of each failure (per mask). ``clean``: masks left as they are, so
    that R still maps a correct mask onto itself (good predictions keep a high pDC)."""

    clean: float = 0.25
    boxes: float = 0.5
    max_boxes: int = 20
    box_half_frac: float = 0.06  # largest box half-size as a fraction of the image side
    rv_missing: float = 0.1
    rv_partial: float = 0.15
    fragment: float = 0.2
    morphology: float = 0.3
    affine: float = 0.3
    shift_frac: float = 0.08
    rotate_deg: float = 10.0
    elastic: float = 0.2
    elastic_px: float = 3.0


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, max(high, low + 1), (1,), generator=generator, device=generator.device))


def _boxes(mask: torch.Tensor, cfg: CorruptionConfig, g: torch.Generator) -> torch.Tensor:
    h, w = mask.shape
    out = mask.clone()
    largest = max(1, int(cfg.box_half_frac * min(h, w)))
    for _ in range(_randint(g, 1, cfg.max_boxes + 1)):
        r = _randint(g, 1, largest + 1)
        y, x = _randint(g, r, h - r), _randint(g, r, w - r)
        if _rand(g, 1).item() < 0.5:
            sy, sx = _randint(g, r, h - r), _randint(g, r, w - r)
            out[y - r:y + r, x - r:x + r] = mask[sy - r:sy + r, sx - r:sx + r]
        else:
            out[y - r:y + r, x - r:x + r] = 0
    return out


def _partial_rv(mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    h, w = mask.shape
    rv = mask == RV
    if not rv.any():
        return mask
    ys, xs = torch.nonzero(rv, as_tuple=True)
    cy, cx = ys.float().mean(), xs.float().mean()
    angle = 2 * math.pi * _rand(g, 1).item()
    yy, xx = torch.meshgrid(torch.arange(h, device=mask.device), torch.arange(w, device=mask.device), indexing="ij")
    side = (yy - cy) * math.sin(angle) + (xx - cx) * math.cos(angle) > 0
    return torch.where(rv & side, torch.zeros_like(mask), mask)


def _fragment(mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    h, w = mask.shape
    r = _randint(g, 2, max(3, min(h, w) // 10))
    cy, cx = _randint(g, 0, h), _randint(g, 0, w)
    yy, xx = torch.meshgrid(torch.arange(h, device=mask.device), torch.arange(w, device=mask.device), indexing="ij")
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return torch.where(disc, torch.full_like(mask, _randint(g, 1, NUM_CLASSES)), mask)


def _morphology(mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    c = _randint(g, 1, NUM_CLASSES)
    k = 2 * _randint(g, 1, 3) + 1
    region = (mask == c).float()[None, None]
    if _rand(g, 1).item() < 0.5:  # dilation over background and other structures
        grown = F.max_pool2d(region, k, stride=1, padding=k // 2)[0, 0] > 0
        return torch.where(grown, torch.full_like(mask, c), mask)
    kept = -F.max_pool2d(-region, k, stride=1, padding=k // 2)[0, 0] > 0
    return torch.where((mask == c) & ~kept, torch.zeros_like(mask), mask)


def _warp(masks: torch.Tensor, chosen: torch.Tensor, cfg: CorruptionConfig, g: torch.Generator,
          elastic: bool) -> torch.Tensor:
    """Shift + rotation (or a smooth elastic field) of the chosen masks, nearest-neighbour."""
    idx = torch.nonzero(chosen, as_tuple=True)[0]
    if idx.numel() == 0:
        return masks
    n, (h, w) = idx.numel(), masks.shape[1:]
    base = F.affine_grid(torch.eye(2, 3, device=masks.device).expand(n, 2, 3), (n, 1, h, w), align_corners=False)
    if elastic:
        coarse = (_rand(g, n, 2, 5, 5) * 2 - 1) * (2 * cfg.elastic_px / min(h, w))
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        grid = base + field
    else:
        angle = (_rand(g, n) * 2 - 1) * math.radians(cfg.rotate_deg)
        shift = (_rand(g, n, 2) * 2 - 1) * 2 * cfg.shift_frac
        theta = torch.stack([torch.stack([angle.cos(), -angle.sin(), shift[:, 0]], 1),
                             torch.stack([angle.sin(), angle.cos(), shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    warped = F.grid_sample(masks[idx, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)[:, 0].to(masks.dtype)
    out = masks.clone()
    out[idx] = warped
    return out


def corrupt_masks(masks: torch.Tensor, generator: torch.Generator,
                  config: CorruptionConfig | None = None) -> torch.Tensor:
    """Corrupted copies of ``masks`` ((N, H, W) integer labels); a ``clean`` share is left intact."""
    cfg = config or CorruptionConfig()
    g = generator
    masks = masks.long()
    n = masks.shape[0]
    dirty = _rand(g, n) >= cfg.clean
    out = masks.clone()
    for i in torch.nonzero(dirty, as_tuple=True)[0].tolist():
        m = out[i]
        if _rand(g, 1).item() < cfg.boxes:
            m = _boxes(m, cfg, g)
        u = _rand(g, 1).item()
        if u < cfg.rv_missing:
            m = torch.where(m == RV, torch.zeros_like(m), m)
        elif u < cfg.rv_missing + cfg.rv_partial:
            m = _partial_rv(m, g)
        if _rand(g, 1).item() < cfg.fragment:
            m = _fragment(m, g)
        if _rand(g, 1).item() < cfg.morphology:
            m = _morphology(m, g)
        out[i] = m
    out = _warp(out, dirty & (_rand(g, n) < cfg.affine), cfg, g, elastic=False)
    out = _warp(out, dirty & (_rand(g, n) < cfg.elastic), cfg, g, elastic=True)
    return out
