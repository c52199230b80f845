"""Dice and Hausdorff distance (mm) of a padded batch of cases, in torch (any device, aimed at GPU).

Same definitions and empty-structure conventions as :mod:`fedqc.qc.metrics` (read its module
docstring): MONAI's edges (face-neighbour erosion, grid border counts as outside), exact Euclidean
distances in mm between the two edge point sets, symmetric maximum or ``percentile``-th percentile
(linear interpolation); both structures empty gives Dice 1 and Hausdorff 0, exactly one empty gives
Dice 0 and Hausdorff = the image diagonal in mm.

Every step is a whole-batch tensor op: no Python loop over cases, no copy of data between host and
device (only small host synchronisations: the foreground box, sizes, one per search ring). The batch
is first cropped to its foreground box. Two methods give the same values:

* ``"window"`` (default): the CPU algorithm: exact distances along W by a doubling scan, then rings
  of rows (z + dz, h + dh) around each query until certified. On an H200, 20,000-slice batches of
  128 x 128 ran at 460k slices/s (RV) and 160k slices/s (LV, myocardium and RV).
* ``"cdist"``: all pairs of edge points of each structure pair (``torch.cdist``, chunked). Simple and
  exact, but two orders of magnitude slower on the H200 (short-axis stacks, RV: 3.7k slices/s).

A batch holds cases of one grid: pad shorter stacks with background slices (edges and distances do
not change; pass ``shape_zhw`` so the empty-structure cap uses the true size). Single slices go in
a batch of their own, as ``(B, H, W)`` (or ``(B, 1, H, W)``), and are scored in 2D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_FAR_MM = 1.0e7  # coordinate of padding points: farther than any real voxel


def dice_hausdorff_mm_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    spacing_mm: torch.Tensor | Sequence[float],
    classes: Sequence[int],
    percentile: float | None = None,
    shape_zhw: torch.Tensor | None = None,
    method: str = "window",
    max_chunk_elements: int = 1 << 27,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class Dice and symmetric Hausdorff distance (mm) of a batch of label-map pairs.

    Args:
        a: integer label maps ``(B, Z, H, W)``, or ``(B, H, W)`` / ``(B, 1, H, W)`` for single slices.
        b: integer label maps of the same shape, on the same device.
        spacing_mm: voxel spacing ``(z, h, w)`` (or ``(h, w)``) in mm, shared ``(3,)`` or per case
            ``(B, 3)``; the z value is ignored for single slices.
        classes: label values to score.
        percentile: ``None`` for the maximum, else a value in ``(0, 100]``.
        shape_zhw: true ``(B, 3)`` grid size of each case before padding, for the empty cap only.
        method: ``"window"`` (row scans and a windowed search, as the CPU path) or ``"cdist"``
            (all pairs of edge points, chunked): same values, different cost.
        max_chunk_elements: ``"cdist"`` only: bound on the distance block held at once.

    Returns:
        ``(dice, hausdorff_mm)``, float tensors ``(B, len(classes))`` on the input device.
    """
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100] or None, got {percentile}")
    if not classes:
        raise ValueError("classes must name at least one label")
    if a.ndim == 4 and a.shape[1] == 1:
        a, b = a[:, 0], b[:, 0]
    planar = a.ndim == 3
    if not planar and a.ndim != 4:
        raise ValueError(f"label maps must be (B, Z, H, W) or (B, H, W), got {tuple(a.shape)}")
    if planar:
        a, b = a[:, None], b[:, None]
    device, n_cases, n_classes = a.device, a.shape[0], len(classes)
    spacing = _spacing_per_case(spacing_mm, n_cases, planar, device)
    grid = shape_zhw.to(device) if shape_zhw is not None else torch.tensor(a.shape[1:], device=device)
    if 0 not in classes:  # crop the batch to its foreground: edges and distances do not change
        a, b = _crop_to_foreground(a, b)
    label = torch.as_tensor(list(classes), device=device).view(1, -1, 1, 1, 1)
    in_a = (a[:, None] == label).flatten(0, 1)  # (pairs, Z, H, W), pair = case * n_classes + class
    in_b = (b[:, None] == label).flatten(0, 1)
    n_a, n_b = in_a.flatten(1).sum(1), in_b.flatten(1).sum(1)
    n_ab = (in_a & in_b).flatten(1).sum(1)
    total = n_a + n_b
    dice = torch.where(total > 0, 2.0 * n_ab / total.clamp(min=1), 1.0)

    edges_a, edges_b = _edges(in_a, planar), _edges(in_b, planar)
    spacing_pair = spacing.repeat_interleave(n_classes, dim=0)
    if method == "window":
        directed = _directed_window_mm(edges_a, edges_b, spacing_pair, percentile)
    elif method == "cdist":
        directed = _directed_cdist_mm(edges_a, edges_b, spacing_pair, percentile, max_chunk_elements)
    else:
        raise ValueError(f"method must be 'window' or 'cdist', got {method!r}")
    n_pairs = n_cases * n_classes
    hausdorff = torch.maximum(directed[:n_pairs], directed[n_pairs:])

    extent = grid.to(spacing.dtype) * spacing
    extent = extent[..., 1:] if planar else extent
    cap_mm = torch.linalg.vector_norm(extent, dim=-1).expand(n_cases).repeat_interleave(n_classes)
    hausdorff = torch.where((n_a > 0) & (n_b > 0), hausdorff.to(cap_mm.dtype), cap_mm)
    hausdorff = torch.where(total > 0, hausdorff, torch.zeros_like(hausdorff))
    return dice.view(n_cases, n_classes), hausdorff.view(n_cases, n_classes)


def pseudo_scores_torch(
    pred: torch.Tensor,
    recon: torch.Tensor,
    spacing_mm: torch.Tensor | Sequence[float],
    classes: Sequence[int],
    percentile: float | None = None,
    shape_zhw: torch.Tensor | None = None,
    method: str = "window",
) -> tuple[torch.Tensor, torch.Tensor]:
    """pDC and pHD (mm) per case of a batch: means over ``classes`` of Dice and Hausdorff.

    Args:
        pred: the segmenter's label maps, as ``a`` of :func:`dice_hausdorff_mm_torch`.
        recon: the QC autoencoder's label maps, same shape.
        spacing_mm: ``(3,)`` or ``(B, 3)`` spacing in mm.
        classes: labels entering the scores, e.g. ``[3]`` or ``[1, 2, 3]``.
        percentile: ``None`` for the maximum Hausdorff distance, else e.g. ``95``.
        shape_zhw: true grid size per case before padding (empty cap only).
        method: ``"window"`` or ``"cdist"``, see :func:`dice_hausdorff_mm_torch`.

    Returns:
        ``(pdc, phd_mm)``, two float tensors ``(B,)``.
    """
    dice, hausdorff = dice_hausdorff_mm_torch(pred, recon, spacing_mm, classes, percentile, shape_zhw, method)
    return dice.mean(dim=1), hausdorff.mean(dim=1)


def _spacing_per_case(
    spacing_mm: torch.Tensor | Sequence[float], n_cases: int, planar: bool, device: torch.device
) -> torch.Tensor:
    """Spacing as a float64 ``(B, 3)`` tensor; single slices get a unit z spacing (never used)."""
    spacing = torch.as_tensor(spacing_mm, dtype=torch.float64, device=device)
    spacing = spacing.expand(n_cases, spacing.shape[-1]) if spacing.ndim == 1 else spacing
    if planar and spacing.shape[-1] == 2:
        spacing = torch.cat([torch.ones_like(spacing[:, :1]), spacing], dim=1)
    if spacing.shape != (n_cases, 3):
        raise ValueError(f"spacing_mm must be (3,) or ({n_cases}, 3), got {tuple(spacing.shape)}")
    return spacing


def _crop_to_foreground(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both batches cropped to the bounding box of every non-background voxel of either."""
    union = ((a != 0) | (b != 0)).any(dim=0)
    present = [union.any(dim=[d for d in range(3) if d != axis]) for axis in range(3)]
    flags = torch.cat(present).cpu().numpy()  # host synchronisation: Z + H + W flags
    box, start = [slice(None)], 0
    for length in union.shape:
        hits = flags[start : start + length].nonzero()[0]
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 1))
        start += length
    return a[tuple(box)], b[tuple(box)]


def _edges(masks: torch.Tensor, planar: bool) -> torch.Tensor:
    """MONAI's edges of (N, Z, H, W) masks: voxels with a face neighbour outside the mask or grid."""
    n_z, n_h, n_w = masks.shape[1:]
    if n_h < 3 or n_w < 3 or (not planar and n_z < 3):
        return masks.clone()  # every voxel lies on the grid border
    z = slice(None) if planar else slice(1, -1)
    core = (slice(None), z, slice(1, -1), slice(1, -1))
    inner = masks[core] & masks[:, z, :-2, 1:-1] & masks[:, z, 2:, 1:-1]
    inner &= masks[:, z, 1:-1, :-2] & masks[:, z, 1:-1, 2:]
    if not planar:
        inner &= masks[:, :-2, 1:-1, 1:-1] & masks[:, 2:, 1:-1, 1:-1]
    edges = masks.clone()
    edges[core] &= ~inner
    return edges


def _directed_cdist_mm(
    edges_a: torch.Tensor, edges_b: torch.Tensor, spacing: torch.Tensor, percentile: float | None, chunk: int
) -> torch.Tensor:
    """Directed distances a->b then b->a per pair, from all pairs of edge points (chunked cdist)."""
    spacing_dir = torch.cat([spacing, spacing])
    targets = torch.cat([edges_b, edges_a])
    queries, valid = _padded_points_mm(_queries(edges_a, edges_b, targets), spacing_dir)
    points, _ = _padded_points_mm(targets, spacing_dir)
    n, n_queries, _ = queries.shape
    step = max(1, chunk // max(n * points.shape[1], 1))
    exact = "donot_use_mm_for_euclid_dist"  # the matrix-product shortcut loses precision
    blocks = [
        torch.cdist(queries[:, i : i + step], points, compute_mode=exact).amin(dim=2)
        for i in range(0, n_queries, step)
    ]
    nearest = torch.cat(blocks, dim=1)
    owner = torch.arange(n, device=nearest.device)[:, None].expand_as(nearest)
    n_zero = (edges_a & edges_b).flatten(1).sum(1).repeat(2) if percentile is not None else None
    return _reduce_directed(nearest[valid], owner[valid], n, n_zero, percentile)


def _queries(edges_a: torch.Tensor, edges_b: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Edge voxels to search from, a->b then b->a: those not shared by the other structure, in pairs
    whose other structure is not empty (such pairs get the empty cap; searching them would scan the
    whole grid for every edge voxel without ever finding a target)."""
    has_target = targets.flatten(1).any(dim=1).view(-1, 1, 1, 1)
    return torch.cat([edges_a & ~edges_b, edges_b & ~edges_a]) & has_target


def _padded_points_mm(masks: torch.Tensor, spacing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (mm) of each mask's voxels, padded: ``(N, P, 3)`` float32 and a validity mask."""
    n, n_z, n_h, n_w = masks.shape
    owner, flat = masks.flatten(1).nonzero(as_tuple=True)
    counts = torch.bincount(owner, minlength=n)
    width = max(int(counts.max()) if n else 0, 1)  # host synchronisation: the padded size
    slot = torch.arange(owner.numel(), device=masks.device) - (torch.cumsum(counts, 0) - counts)[owner]
    zhw = torch.stack([flat // (n_h * n_w), flat // n_w % n_h, flat % n_w], dim=1)
    coords = torch.full((n, width, 3), _FAR_MM, dtype=torch.float32, device=masks.device)
    coords[owner, slot] = (zhw * spacing[owner]).to(torch.float32)
    valid = torch.arange(width, device=masks.device)[None] < counts[:, None]
    return coords, valid


def _directed_window_mm(
    edges_a: torch.Tensor, edges_b: torch.Tensor, spacing: torch.Tensor, percentile: float | None
) -> torch.Tensor:
    """Directed distances a->b then b->a per pair, by row scans and a windowed search.

    The algorithm of :func:`fedqc.qc.surface_distance._windowed_search`: exact distances along W
    from a doubling scan, then rings of rows (z + dz, h + dh) around each query until certified.
    """
    targets = torch.cat([edges_b, edges_a])
    n, n_z, n_h, n_w = targets.shape
    gaps = _row_gaps_px(targets).view(-1)
    problem, z, h, w = _queries(edges_a, edges_b, targets).nonzero(as_tuple=True)
    flat = ((problem * n_z + z) * n_h + h) * n_w + w
    s_z, s_h, s_w = torch.cat([spacing, spacing]).to(torch.float32)[problem].unbind(1)
    ratio = float((spacing[:, 1] / spacing[:, 0]).max()) if n else 0.0  # host synchronisation
    group = problem % (n // 2) if percentile is None else None
    best = torch.full(flat.shape, float("inf"), device=flat.device)
    keep = torch.arange(flat.numel(), device=flat.device)
    group_max = torch.zeros(max(n // 2, 1), device=flat.device)
    rz_done, rh_done, rh = -1, -1, 1
    while keep.numel():  # host synchronisation once per ring
        rz, rh_now = min(int(rh * ratio), n_z - 1), min(rh, n_h - 1)
        if rz == rz_done and rh_now == rh_done:  # h is exhausted: widen along z instead
            rz = rz_done + 1
        dz, dh = torch.meshgrid(torch.arange(-rz, rz + 1), torch.arange(-rh_now, rh_now + 1), indexing="ij")
        ring = (dz.abs() > rz_done) | (dh.abs() > rh_done)
        dz, dh = dz[ring].to(flat.device)[:, None], dh[ring].to(flat.device)[:, None]
        rows = ((z + dz).clamp(0, n_z - 1) - z) * (n_h * n_w) + ((h + dh).clamp(0, n_h - 1) - h) * n_w
        gap = gaps[rows + flat]
        cand = (s_w * gap) ** 2 + (s_z * dz) ** 2 + (s_h * dh) ** 2
        cand = torch.where(gap >= n_w, float("inf"), cand)  # no target edge in that row
        now = torch.minimum(best[keep], cand.amin(dim=0))
        best[keep] = now
        reach_z = (s_z * (rz + 1)) ** 2 if rz < n_z - 1 else torch.full_like(now, float("inf"))
        reach_h = (s_h * (rh_now + 1)) ** 2 if rh_now < n_h - 1 else torch.full_like(now, float("inf"))
        final = now <= torch.minimum(reach_z, reach_h)
        if group is not None:
            group_max.scatter_reduce_(0, group[final], now[final], reduce="amax")
            final |= now <= group_max[group]
            group = group[~final]
        left = ~final
        keep, flat, z, h = keep[left], flat[left], z[left], h[left]
        s_z, s_h, s_w = s_z[left], s_h[left], s_w[left]
        rz_done, rh_done, rh = rz, rh_now, rh * 2
    n_zero = (edges_a & edges_b).flatten(1).sum(1).repeat(2) if percentile is not None else None
    return _reduce_directed(best.sqrt(), problem, n, n_zero, percentile)


def _row_gaps_px(edges: torch.Tensor) -> torch.Tensor:
    """Voxels to the nearest edge voxel along the last axis (doubling scan); none: >= its length."""
    n_w = edges.shape[-1]
    dtype, far = (torch.int16, 16000) if n_w < 8000 else (torch.int32, 1 << 30)
    gaps = (~edges).to(dtype) * far
    k = 1
    while k < n_w:  # after the pass for k, gaps below 2k are exact
        gaps[..., k:] = torch.minimum(gaps[..., k:], gaps[..., :-k] + k)
        gaps[..., :-k] = torch.minimum(gaps[..., :-k], gaps[..., k:] + k)
        k *= 2
    return gaps


def _reduce_directed(
    dist: torch.Tensor, owner: torch.Tensor, n: int, n_zero: torch.Tensor | None, percentile: float | None
) -> torch.Tensor:
    """Per-owner maximum, or percentile (linear, as ``torch.quantile``) with ``n_zero`` extra zeros."""
    dist = dist.to(torch.float64)
    if percentile is None:
        zeros = torch.zeros(n, dtype=dist.dtype, device=dist.device)
        return zeros.scatter_reduce(0, owner, dist, reduce="amax")
    order = torch.argsort(dist, stable=True)
    order = order[torch.argsort(owner[order], stable=True)]
    ranked = dist[order]
    counts = torch.bincount(owner, minlength=n)
    start = torch.cumsum(counts, 0) - counts
    n_total = n_zero + counts
    position = (n_total - 1).clamp(min=0).to(torch.float64) * (percentile / 100.0)
    lower = position.floor().long()
    upper = torch.minimum(lower + 1, (n_total - 1).clamp(min=0))

    def kth_smallest(k: torch.Tensor) -> torch.Tensor:
        j = k - n_zero
        if ranked.numel() == 0:
            return torch.zeros_like(position)
        picked = ranked[(start + j).clamp(0, ranked.numel() - 1)]
        return torch.where(j < 0, torch.zeros_like(picked), picked)

    low, high = kth_smallest(lower), kth_smallest(upper)
    return low + (high - low) * (position - lower)
