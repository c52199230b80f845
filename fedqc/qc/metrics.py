"""Dice and Hausdorff distance (mm) between two label maps of one case, on the CPU.

A *case* is one subject / view / phase: its slices stacked as a ``(Z, H, W)`` label map in the
network grid, or one ``(H, W)`` slice. Hausdorff values equal MONAI's
``compute_hausdorff_distance`` (one-hot inputs, ``spacing=``, euclidean, ``directed=False``) on
non-empty structures: MONAI's edges (voxels with a face neighbour outside the structure or the
grid), exact distances in mm with the anisotropic spacing from each edge voxel to the nearest edge
voxel of the other structure, and the larger of the two directed maxima (or ``percentile``-th
percentiles, linear interpolation as ``torch.quantile``).

Deliberate differences from MONAI (docs/QC.md): both structures empty gives Dice 1 and Hausdorff 0
(MONAI: nan); exactly one empty gives Dice 0 and Hausdorff :func:`empty_structure_cap_mm`, the
image diagonal (MONAI: inf), so means and quartiles stay finite; a ``(1, H, W)`` stack is scored in
2D on its slice.

Speed: no distance transform and no KD-tree. Structure pairs are cropped to the bounding box of
their union and padded together into one array; distances along W come from two sweeps, and rows
(z + dz, h + dh) are searched in growing windows until each value is certified exact. Edge voxels
shared by both structures are at distance 0 and never searched; for the maximum, voxels that cannot
raise it are dropped early. This module validates, crops and batches the cases and scores Dice; the
search itself is in :mod:`fedqc.qc.surface_distance`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fedqc.qc.surface_distance import hausdorff_batch_mm, voxel_batches

Case = tuple[np.ndarray, np.ndarray, Sequence[float]]


def empty_structure_cap_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    """The Hausdorff value reported when exactly one of the two structures is empty.

    Args:
        shape: image shape, ``(Z, H, W)`` or ``(H, W)``.
        spacing_mm: voxel spacing in mm, one value per axis of ``shape``.

    Returns:
        The image diagonal ``sqrt(sum((n_i * s_i)^2))`` in mm: strictly larger than any distance
        between two voxels of the grid.
    """
    extent_mm = np.asarray(shape, dtype=np.float64) * np.asarray(spacing_mm, dtype=np.float64)
    return float(np.sqrt(np.sum(extent_mm**2)))


def dice(a: np.ndarray, b: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Dice coefficient per class between two label maps (both empty: 1, one empty: 0).

    Args:
        a: integer label map, any shape.
        b: integer label map of the same shape.
        classes: label values to score.

    Returns:
        float64 array, one Dice per entry of ``classes``.
    """
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    out = np.empty(len(classes))
    for k, c in enumerate(classes):
        in_a, in_b = a == c, b == c
        total = np.count_nonzero(in_a) + np.count_nonzero(in_b)
        out[k] = 1.0 if total == 0 else 2.0 * np.count_nonzero(in_a & in_b) / total
    return out


def hausdorff_mm(
    a: np.ndarray,
    b: np.ndarray,
    spacing_mm: Sequence[float],
    classes: Sequence[int],
    percentile: float | None = None,
) -> np.ndarray:
    """Symmetric Hausdorff distance in mm per class between two label maps.

    Args:
        a: integer label map ``(Z, H, W)`` or ``(H, W)``.
        b: integer label map of the same shape.
        spacing_mm: voxel spacing in mm, ``(z, h, w)`` (or ``(h, w)`` for a 2D map).
        classes: label values to score.
        percentile: ``None`` for the maximum, else a value in ``(0, 100]``.

    Returns:
        float64 array, one distance per entry of ``classes`` (empty structures: see module doc).
    """
    return dice_hausdorff_mm_batch([(a, b, spacing_mm)], classes, percentile, n_threads=1)[1][0]


def pseudo_scores(
    pred: np.ndarray,
    recon: np.ndarray,
    spacing_mm: Sequence[float],
    classes: Sequence[int],
    percentile: float | None = None,
) -> tuple[float, float]:
    """pDC and pHD of one case: Dice and Hausdorff (mm) between prediction and reconstruction.

    Args:
        pred: the segmenter's label map ``(Z, H, W)`` or ``(H, W)``.
        recon: the QC autoencoder's label map (argmax of its reconstruction), same shape.
        spacing_mm: voxel spacing in mm, ``(z, h, w)`` (or ``(h, w)`` for a 2D map).
        classes: labels entering the scores, e.g. ``[3]`` (RV) or ``[1, 2, 3]`` (foreground).
        percentile: ``None`` for the maximum Hausdorff distance, else e.g. ``95``.

    Returns:
        ``(pdc, phd_mm)``: the means over ``classes`` of Dice and of the Hausdorff distance.
    """
    pdc, phd = pseudo_scores_batch([(pred, recon, spacing_mm)], classes, percentile, n_threads=1)
    return float(pdc[0]), float(phd[0])


def pseudo_scores_batch(
    cases: Sequence[Case],
    classes: Sequence[int],
    percentile: float | None = None,
    n_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """pDC and pHD (mm) of many cases, spread over a thread pool.

    Args:
        cases: ``(pred, recon, spacing_mm)`` per case; shapes may differ between cases.
        classes: labels entering the scores (mean over them).
        percentile: ``None`` for the maximum Hausdorff distance, else a value in ``(0, 100]``.
        n_threads: worker threads; ``None`` uses every CPU this process may run on.

    Returns:
        ``(pdc, phd_mm)``, two float64 arrays of length ``len(cases)``.
    """
    dice_k, hd_k = dice_hausdorff_mm_batch(cases, classes, percentile, n_threads)
    return dice_k.mean(axis=1), hd_k.mean(axis=1)


def dice_hausdorff_mm_batch(
    cases: Sequence[Case],
    classes: Sequence[int],
    percentile: float | None = None,
    n_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice and Hausdorff distance (mm) of many cases.

    Args:
        cases: ``(a, b, spacing_mm)`` per case.
        classes: label values to score.
        percentile: ``None`` for the maximum Hausdorff distance, else a value in ``(0, 100]``.
        n_threads: worker threads; ``None`` uses every CPU this process may run on.

    Returns:
        ``(dice, hausdorff_mm)``, two float64 arrays of shape ``(len(cases), len(classes))``.
    """
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes must name at least one label")
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100] or None, got {percentile}")
    if n_threads is None:
        n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    n_chunks = max(1, min(int(n_threads), len(cases)))
    if n_chunks == 1:
        return _score_chunk(cases, classes, percentile)
    bounds = np.linspace(0, len(cases), n_chunks + 1).astype(int)
    chunks = [cases[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max_workers=n_chunks) as pool:
        parts = list(pool.map(lambda chunk: _score_chunk(chunk, classes, percentile), chunks))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _as_grid(a: np.ndarray, b: np.ndarray, spacing_mm: Sequence[float]) -> tuple:
    """Validate one case; return 3D views, a 3-vector spacing, the empty-structure cap, planar flag."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    if a.dtype.kind not in "biu" or b.dtype.kind not in "biu":
        raise ValueError(f"label maps must hold integers, got {a.dtype} and {b.dtype}")
    spacing = np.asarray(spacing_mm, dtype=np.float64).ravel()
    if a.ndim == 3 and a.shape[0] == 1:  # a single slice is scored in 2D
        a, b = a[0], b[0]
    if a.ndim not in (2, 3):
        raise ValueError(f"label maps must be (Z, H, W) or (H, W), got shape {a.shape}")
    if spacing.size == 3 and a.ndim == 2:
        spacing = spacing[1:]
    if spacing.size != a.ndim or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing_mm must hold {a.ndim} positive values, got {list(spacing_mm)}")
    cap_mm = empty_structure_cap_mm(a.shape, spacing)
    planar = a.ndim == 2
    if planar:
        a, b, spacing = a[None], b[None], np.concatenate([[1.0], spacing])
    return a, b, spacing, cap_mm, planar


def _union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the non-background voxels of both maps, or None when both are empty."""
    union = np.bitwise_or(a, b)  # non-zero where either map is
    z = np.flatnonzero(union.reshape(union.shape[0], -1).max(axis=1))
    if z.size == 0:
        return None
    hw_any = union[z[0] : z[-1] + 1].max(axis=0)
    h, w = np.flatnonzero(hw_any.max(axis=1)), np.flatnonzero(hw_any.max(axis=0))
    return slice(z[0], z[-1] + 1), slice(h[0], h[-1] + 1), slice(w[0], w[-1] + 1)


def _class_boxes(union: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class bounding boxes of ``union`` (C, Z, H, W): ``(start, stop)`` arrays of shape (C, 3)."""
    hw_any = union.any(axis=1)
    present = (union.any(axis=(2, 3)), hw_any.any(axis=2), hw_any.any(axis=1))
    start = np.stack([p.argmax(axis=1) for p in present], axis=1)
    stop = np.stack([p.shape[1] - p[:, ::-1].argmax(axis=1) for p in present], axis=1)
    return start, stop


def _score_chunk(
    cases: Sequence[Case], classes: list[int], percentile: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Dice and Hausdorff per (case, class) of a chunk; structure pairs are searched in batches."""
    n_classes = len(classes)
    dice_out = np.ones((len(cases), n_classes))  # defaults: both structures empty
    hd_out = np.zeros((len(cases), n_classes))
    label = np.asarray(classes).reshape(-1, 1, 1, 1)
    pairs: dict[bool, list] = {True: [], False: []}  # planar -> (slot, mask a, mask b, spacing)
    for i, (a, b, spacing_mm) in enumerate(cases):
        a, b, spacing, cap_mm, planar = _as_grid(a, b, spacing_mm)
        box = _union_box(a, b) if 0 not in classes else (slice(None),) * 3
        if box is None:
            continue
        in_a, in_b = a[box][None] == label, b[box][None] == label
        start, stop = _class_boxes(in_a | in_b)
        for k in range(n_classes):
            sub = tuple(slice(lo, hi) for lo, hi in zip(start[k], stop[k]))
            mask_a, mask_b = in_a[k][sub], in_b[k][sub]
            n_a, n_b = np.count_nonzero(mask_a), np.count_nonzero(mask_b)
            if n_a and n_b:
                dice_out[i, k] = 2.0 * np.count_nonzero(mask_a & mask_b) / (n_a + n_b)
                pairs[planar].append((i * n_classes + k, mask_a, mask_b, spacing))
            elif n_a or n_b:
                dice_out[i, k], hd_out[i, k] = 0.0, cap_mm
    for planar, group in pairs.items():
        group.sort(key=lambda pair: pair[1].size)
        for batch in voxel_batches(group):
            slots = [pair[0] for pair in batch]
            hd_out.reshape(-1)[slots] = hausdorff_batch_mm(batch, planar, percentile)
    return dice_out, hd_out
