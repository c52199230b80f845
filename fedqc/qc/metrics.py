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
raise it are dropped early.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

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
        for batch in _voxel_batches(group):
            slots = [pair[0] for pair in batch]
            hd_out.reshape(-1)[slots] = _hausdorff_batch_mm(batch, planar, percentile)
    return dice_out, hd_out


def _voxel_batches(pairs: list, budget_voxels: int = 1 << 20) -> list[list]:
    """Split size-sorted pairs into batches whose padded volume stays under ``budget_voxels``."""
    batches, current, box = [], [], np.zeros(3, dtype=np.int64)
    for pair in pairs:
        grown = np.maximum(box, pair[1].shape)
        if current and (len(current) + 1) * grown.prod() > budget_voxels:
            batches.append(current)
            current, grown = [], np.asarray(pair[1].shape, dtype=np.int64)
        current.append(pair)
        box = grown
    return batches + [current] if current else batches


def _hausdorff_batch_mm(pairs: list, planar: bool, percentile: float | None) -> np.ndarray:
    """Symmetric Hausdorff (mm) of (slot, mask a, mask b, spacing) pairs padded into one array.

    The array is laid out (W, 2, pair, Z, H) so that the row scan along W runs over whole planes.
    """
    n = len(pairs)
    n_z, n_h, n_w = np.max([pair[1].shape for pair in pairs], axis=0)
    masks = np.zeros((n_w, 2, n, n_z, n_h), dtype=bool)  # padding is outside both structures
    for m, (_, mask_a, mask_b, _) in enumerate(pairs):
        z, h, w = mask_a.shape
        masks[:w, 0, m, :z, :h] = mask_a.transpose(2, 0, 1)
        masks[:w, 1, m, :z, :h] = mask_b.transpose(2, 0, 1)
    edges = _edges(masks, axes=(0, 4) if planar else (0, 3, 4))
    gaps_px = _row_gaps_px(edges[:, ::-1])  # gaps_px[:, 0]: to the edges of b, direction a -> b
    source = np.flatnonzero(edges & ~edges[:, ::-1])  # edges that are not edges of the other mask
    plane = n_z * n_h
    problem = source // plane % (2 * n)  # direction * n + pair
    pair = problem % n
    spacing = np.asarray([p[3] for p in pairs])
    uniform = np.ptp(spacing, axis=0).max() == 0
    sq_mm2 = _windowed_search(
        gaps_px.ravel(), source, source // n_h % n_z, source % n_h, (n_z, n_h, n_w),
        spacing[0] if uniform else spacing[pair].T, group=pair if percentile is None else None,
    )
    dist_mm = np.sqrt(sq_mm2)
    if percentile is None:
        directed = np.zeros(2 * n)
        np.maximum.at(directed, problem, dist_mm)
    else:
        shared = np.flatnonzero(edges[:, 0] & edges[:, 1]) // plane % n
        n_zero = np.tile(np.bincount(shared, minlength=n), 2)
        n_total = n_zero + np.bincount(problem, minlength=2 * n)
        directed = _percentile_with_zeros(dist_mm, problem, n_zero, n_total, percentile)
    return np.maximum(directed[:n], directed[n:])


def _edges(masks: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """MONAI's edges: voxels with a neighbour along ``axes`` outside the mask or the array."""
    core = [slice(None)] * masks.ndim
    for axis in axes:
        core[axis] = slice(1, -1)
    edges = masks.copy()
    if edges[tuple(core)].size == 0:
        return edges  # every voxel lies on the array border
    inner = masks[tuple(core)].copy()
    for axis in axes:
        for lo, hi in ((0, -2), (2, None)):
            neighbour = list(core)
            neighbour[axis] = slice(lo, hi)
            inner &= masks[tuple(neighbour)]
    edges[tuple(core)] ^= inner  # inner voxels are mask voxels: clear them
    return edges


def _row_gaps_px(edges: np.ndarray) -> np.ndarray:
    """Voxels from each voxel to the nearest edge voxel along axis 0; none: >= ``edges.shape[0]``."""
    n = edges.shape[0]
    kind, far = (np.int16, 16000) if n < 8000 else (np.int32, 1 << 30)
    gaps = np.multiply(~edges, kind(far), dtype=kind)
    step = np.empty_like(gaps[0])
    for i in range(1, n):  # two sweeps over whole planes: few calls, each on many voxels
        np.minimum(gaps[i], np.add(gaps[i - 1], 1, out=step), out=gaps[i])
    for i in range(n - 2, -1, -1):
        np.minimum(gaps[i], np.add(gaps[i + 1], 1, out=step), out=gaps[i])
    return gaps


def _windowed_search(
    gaps_px: np.ndarray,
    flat: np.ndarray,
    z: np.ndarray,
    h: np.ndarray,
    dims: tuple[int, int, int],
    s_zhw: np.ndarray,
    group: np.ndarray | None,
) -> np.ndarray:
    """Exact squared distance (mm^2) from each query voxel to the nearest target edge voxel.

    The rows (z + dz, h + dh) around a query are scanned in rings of a window that doubles along
    h and grows along z to the same radius in mm; ``gaps_px`` gives the distance along each row.
    A query is final once its best value is no larger than the distance to any row outside the
    window. Rows leaving the grid are clipped to its border, which only adds overestimates of
    rows inside the window. With ``group`` given (maximum only), a query whose upper bound cannot
    exceed its group's certified maximum is dropped, keeping that bound: the maximum is unchanged.

    Args:
        gaps_px: row gaps of the targets (:func:`_row_gaps_px`), raveled.
        flat: flat index of each query voxel in ``gaps_px``; ``z``, ``h``: its grid coordinates.
        dims: grid shape ``(Z, H, W)`` shared by all queries (storage order W, ..., Z, H).
        s_zhw: spacing in mm, shape (3,) when shared, else (3, n_queries).
        group: structure pair of each query, for pruning; ``None`` to compute every value.
    """
    n_z, n_h, n_w = dims
    stride_z, stride_h = n_h, 1  # grids are laid out (W, 2, pair, Z, H)
    s_z, s_h, s_w = s_zhw
    best = np.full(len(flat), np.inf)
    keep = np.arange(len(flat))
    group_max = np.zeros(int(group.max()) + 1 if group is not None and len(flat) else 0)
    rz_done, rh_done, rh = -1, -1, 1
    while keep.size:
        rz = int(min(np.max(np.floor(rh * s_h / s_z)), n_z - 1))
        rh_now = min(rh, n_h - 1)
        if rz == rz_done and rh_now == rh_done:  # h is exhausted: widen along z instead
            rz = rz_done + 1
        dz, dh = np.meshgrid(np.arange(-rz, rz + 1), np.arange(-rh_now, rh_now + 1), indexing="ij")
        ring = (np.abs(dz) > rz_done) | (np.abs(dh) > rh_done)
        dz, dh = dz[ring][:, None], dh[ring][:, None]
        rows = (np.clip(z + dz, 0, n_z - 1) - z) * stride_z + (np.clip(h + dh, 0, n_h - 1) - h) * stride_h
        gap = gaps_px[rows + flat]
        cand = (s_w * gap) ** 2 + (s_z * dz) ** 2 + (s_h * dh) ** 2
        cand[gap >= n_w] = np.inf  # no target edge in that row
        now = np.minimum(best[keep], cand.min(axis=0))
        best[keep] = now
        reach_z = np.inf if rz >= n_z - 1 else (s_z * (rz + 1)) ** 2
        reach_h = np.inf if rh_now >= n_h - 1 else (s_h * (rh_now + 1)) ** 2
        final = now <= np.minimum(reach_z, reach_h)
        if group is not None:
            np.maximum.at(group_max, group[final], now[final])
            final |= now <= group_max[group]
            group = group[~final]
        left = ~final
        keep, flat, z, h = keep[left], flat[left], z[left], h[left]
        if np.ndim(s_z):
            s_z, s_h, s_w = s_z[left], s_h[left], s_w[left]
        rz_done, rh_done, rh = rz, rh_now, rh * 2
    return best


def _percentile_with_zeros(
    dist: np.ndarray, problem: np.ndarray, n_zero: np.ndarray, n_total: np.ndarray, percentile: float
) -> np.ndarray:
    """Per-problem percentile (linear interpolation) of its ``dist`` values plus ``n_zero`` zeros."""
    out = np.zeros(len(n_total))
    if dist.size == 0:
        return out
    order = np.lexsort((dist, problem))
    ranked = dist[order]
    start = np.concatenate([[0], np.cumsum(np.bincount(problem, minlength=len(n_total)))[:-1]])
    position = (n_total - 1) * (percentile / 100.0)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, n_total - 1)

    def kth_smallest(k: np.ndarray) -> np.ndarray:
        j = k - n_zero
        return np.where(j < 0, 0.0, ranked[np.clip(start + j, 0, ranked.size - 1)])

    low_value, high_value = kth_smallest(lower), kth_smallest(upper)
    return low_value + (high_value - low_value) * (position - lower)
