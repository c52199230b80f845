"""Dice and Hausdorff distance (mm) of a padded batch of cases, in torch (any device, aimed at GPU).

Same definitions and empty-structure conventions as :mod:`fedqc.qc.metrics` (read its module
docstring): MONAI's edges (face-neighbour erosion, grid border counts as outside), exact Euclidean
distances in mm between the two edge point sets, symmetric maximum or ``percentile``-th percentile
(linear interpolation); both structures empty gives Dice 1 and Hausdorff 0, exactly one empty gives
Dice 0 and Hausdorff = the image diagonal in mm.

How it runs: one-hot masks and edges for every (case, class) pair are built with whole-batch
tensor ops; edge voxels are gathered once with ``nonzero`` into padded per-pair point sets (the
only host synchronisation is reading the largest set size); the distances from each edge voxel not
shared with the other structure to the nearest edge voxel of the other structure come from
``torch.cdist`` in chunks of query points, for every pair at once. There is no Python loop over
cases and no copy of data between host and device.

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
        max_chunk_elements: bound on the distance block held at once (pairs x queries x targets).

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
    label = torch.as_tensor(list(classes), device=device).view(1, -1, 1, 1, 1)
    in_a = (a[:, None] == label).flatten(0, 1)  # (pairs, Z, H, W), pair = case * n_classes + class
    in_b = (b[:, None] == label).flatten(0, 1)
    n_a, n_b = in_a.flatten(1).sum(1), in_b.flatten(1).sum(1)
    n_ab = (in_a & in_b).flatten(1).sum(1)
    total = n_a + n_b
    dice = torch.where(total > 0, 2.0 * n_ab / total.clamp(min=1), torch.ones_like(total, dtype=torch.float32))

    edges_a, edges_b = _edges(in_a, planar), _edges(in_b, planar)
    spacing_pair = spacing.repeat_interleave(n_classes, dim=0)
    sources = torch.cat([edges_a & ~edges_b, edges_b & ~edges_a])  # (2 * pairs, Z, H, W)
    targets = torch.cat([edges_b, edges_a])
    spacing_dir = torch.cat([spacing_pair, spacing_pair])
    queries, query_valid = _padded_points_mm(sources, spacing_dir)
    points, _ = _padded_points_mm(targets, spacing_dir)
    nearest_mm = _nearest_mm(queries, points, max_chunk_elements)
    if percentile is None:
        directed = torch.where(query_valid, nearest_mm, torch.zeros_like(nearest_mm)).amax(dim=1)
    else:
        n_zero = (edges_a & edges_b).flatten(1).sum(1).repeat(2)
        directed = _percentile_with_zeros(nearest_mm, query_valid, n_zero, percentile)
    n_pairs = n_cases * n_classes
    hausdorff = torch.maximum(directed[:n_pairs], directed[n_pairs:])

    grid = shape_zhw.to(device) if shape_zhw is not None else torch.tensor(a.shape[1:], device=device)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """pDC and pHD (mm) per case of a batch: means over ``classes`` of Dice and Hausdorff.

    Args:
        pred: the segmenter's label maps, as ``a`` of :func:`dice_hausdorff_mm_torch`.
        recon: the QC autoencoder's label maps, same shape.
        spacing_mm: ``(3,)`` or ``(B, 3)`` spacing in mm.
        classes: labels entering the scores, e.g. ``[3]`` or ``[1, 2, 3]``.
        percentile: ``None`` for the maximum Hausdorff distance, else e.g. ``95``.
        shape_zhw: true grid size per case before padding (empty cap only).

    Returns:
        ``(pdc, phd_mm)``, two float tensors ``(B,)``.
    """
    dice, hausdorff = dice_hausdorff_mm_torch(pred, recon, spacing_mm, classes, percentile, shape_zhw)
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


def _padded_points_mm(masks: torch.Tensor, spacing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (mm) of each mask's voxels, padded: ``(N, P, 3)`` float32 and a validity mask."""
    n, n_z, n_h, n_w = masks.shape
    owner, flat = masks.flatten(1).nonzero(as_tuple=True)
    counts = torch.bincount(owner, minlength=n)
    width = max(int(counts.max()) if n else 0, 1)  # the one host synchronisation
    slot = torch.arange(owner.numel(), device=masks.device) - (torch.cumsum(counts, 0) - counts)[owner]
    zhw = torch.stack([flat // (n_h * n_w), flat // n_w % n_h, flat % n_w], dim=1)
    coords = torch.full((n, width, 3), _FAR_MM, dtype=torch.float32, device=masks.device)
    coords[owner, slot] = (zhw * spacing[owner]).to(torch.float32)
    valid = torch.arange(width, device=masks.device)[None] < counts[:, None]
    return coords, valid


def _nearest_mm(queries: torch.Tensor, points: torch.Tensor, max_chunk_elements: int) -> torch.Tensor:
    """Exact distance from each query to its nearest point (per batch row), chunked over queries."""
    n, n_queries, _ = queries.shape
    chunk = max(1, max_chunk_elements // max(n * points.shape[1], 1))
    parts = [
        torch.cdist(queries[:, i : i + chunk], points, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=2)
        for i in range(0, n_queries, chunk)
    ]
    return torch.cat(parts, dim=1)


def _percentile_with_zeros(
    nearest_mm: torch.Tensor, valid: torch.Tensor, n_zero: torch.Tensor, percentile: float
) -> torch.Tensor:
    """Per-row percentile (linear interpolation, as ``torch.quantile``) of valid values plus zeros."""
    ranked = torch.where(valid, nearest_mm, torch.full_like(nearest_mm, float("inf"))).sort(dim=1).values
    n_total = n_zero + valid.sum(1)
    position = (n_total - 1).to(torch.float64) * (percentile / 100.0)
    lower = position.floor().long()
    upper = torch.minimum(lower + 1, n_total - 1)

    def kth_smallest(k: torch.Tensor) -> torch.Tensor:
        j = k - n_zero
        picked = ranked.gather(1, j.clamp(0, ranked.shape[1] - 1)[:, None])[:, 0].to(torch.float64)
        return torch.where(j < 0, torch.zeros_like(picked), picked)

    low, high = kth_smallest(lower), kth_smallest(upper)
    return low + (high - low) * (position - lower)
