"""Surface-distance search below :mod:`fedqc.qc.metrics`: symmetric Hausdorff (mm) of mask pairs.

Input is structure pairs already cropped by :mod:`fedqc.qc.metrics`: ``(slot, mask a, mask b,
spacing)`` with both masks non-empty. :func:`voxel_batches` groups size-sorted pairs under a voxel
budget; :func:`hausdorff_batch_mm` pads one group into a single ``(W, 2, pair, Z, H)`` array and
returns one symmetric distance per pair. Below it: MONAI's edges (face-neighbour erosion, grid
border counts as outside), distances along W by two sweeps over whole planes, a windowed search over
the rows ``(z + dz, h + dh)`` until each value is certified exact (for the maximum, voxels that
cannot raise it are dropped early), and percentiles that count shared edge voxels as zeros.
"""

from __future__ import annotations

import numpy as np


def voxel_batches(pairs: list, budget_voxels: int = 1 << 20) -> list[list]:
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


def hausdorff_batch_mm(pairs: list, planar: bool, percentile: float | None) -> np.ndarray:
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
