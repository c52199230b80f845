"""Known answers and MONAI agreement for the QC metrics (CPU path and torch path)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from fedqc.core.types import Label
from fedqc.qc.metrics import (
    dice,
    dice_hausdorff_mm_batch,
    empty_structure_cap_mm,
    hausdorff_mm,
    pseudo_scores,
    pseudo_scores_batch,
)
from fedqc.qc.metrics_torch import dice_hausdorff_mm_torch, pseudo_scores_torch

SA_SPACING_MM = (10.0, 1.25, 1.25)


def disc_stack(shape, center_hw, radius_px, slices=None):
    """Label map with an RV disc of ``radius_px`` in the given slices (all by default)."""
    labels = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    disc = (yy - center_hw[0]) ** 2 + (xx - center_hw[1]) ** 2 <= radius_px**2
    if labels.ndim == 2:
        labels[disc] = Label.RV
    else:
        for z in range(shape[0]) if slices is None else slices:
            labels[z][disc] = Label.RV
    return labels


def heart(rng, shape):
    """Real-looking LV / myocardium / RV label map, 2D or 3D, with some random warp."""
    yy, xx = np.mgrid[: shape[-2], : shape[-1]].astype(float)
    n_z = 1 if len(shape) == 2 else shape[0]
    out = np.zeros((n_z, *shape[-2:]), np.uint8)
    cy, cx = shape[-2] / 2 + rng.uniform(-3, 3), shape[-1] / 2 - 4 + rng.uniform(-3, 3)
    for z in range(n_z):
        taper = 1 - 0.5 * z / max(n_z - 1, 1)
        r = rng.uniform(5, 7) * taper
        d = np.hypot(yy - cy, xx - cx)
        rv = ((yy - cy) / (11 * taper)) ** 2 + ((xx - cx - 8 * taper) / (7 * taper)) ** 2 < 1
        out[z][rv & (d > r + 3)] = 3
        out[z][d < r + 2.5] = 2
        out[z][d < r] = 1
        noise = ndimage.gaussian_filter(rng.standard_normal(shape[-2:]), 3) > 0.15
        out[z][noise & (out[z] == 0) & (d < r + 12)] = 3  # ragged RV border
    return out[0] if len(shape) == 2 else out


def blobs(rng, shape):
    """Random label blobs: smoothed noise cut into three classes."""
    field = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.7, 2.5))
    return np.digitize(field, np.quantile(field, [0.55, 0.75, 0.88])).astype(np.uint8)


def monai_hausdorff(a, b, spacing, classes, percentile=None):
    one_hot = [torch.from_numpy(np.stack([m == c for c in classes])[None]) for m in (a, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(
            one_hot[0], one_hot[1], include_background=True, distance_metric="euclidean",
            percentile=percentile, directed=False, spacing=list(spacing),
        )
    return hd.numpy()[0].astype(np.float64)


def test_identical_masks_score_one_and_zero():
    labels = heart(np.random.default_rng(0), (6, 40, 40))
    pdc, phd = pseudo_scores(labels, labels.copy(), SA_SPACING_MM, [1, 2, 3])
    assert pdc == 1.0 and phd == 0.0
    assert pseudo_scores(labels[2], labels[2], SA_SPACING_MM[1:], [3]) == (1.0, 0.0)


@pytest.mark.parametrize("axis, k", [(1, 1), (1, 3), (2, 2), (2, 5)])
def test_shifted_disc_gives_shift_times_spacing(axis, k):
    spacing = (10.0, 1.5, 0.7)
    a = disc_stack((5, 40, 40), (20, 20), 7, slices=range(1, 4))
    b = np.roll(a, k, axis=axis)
    assert hausdorff_mm(a, b, spacing, [3])[0] == pytest.approx(k * spacing[axis], abs=1e-9)
    assert hausdorff_mm(a[2], b[2], spacing[1:], [3])[0] == pytest.approx(k * spacing[axis], abs=1e-9)


def test_stack_shifted_one_slice_gives_slice_spacing():
    a = disc_stack((8, 32, 32), (16, 16), 6, slices=range(2, 6))
    b = disc_stack((8, 32, 32), (16, 16), 6, slices=range(3, 7))
    assert hausdorff_mm(a, b, SA_SPACING_MM, [3])[0] == pytest.approx(10.0)
    assert hausdorff_mm(a, b, SA_SPACING_MM, [3], percentile=95)[0] == pytest.approx(10.0)


def test_dice_known_overlap():
    a = np.zeros((4, 10), np.uint8)
    b = np.zeros((4, 10), np.uint8)
    a[:, :5], b[:, 3:8] = 3, 3  # 20 and 20 voxels, 8 shared
    b[0, 0] = 1
    np.testing.assert_allclose(dice(a, b, [3, 1, 2]), [2 * 8 / 40, 0.0, 1.0])


def test_empty_structures_follow_the_documented_conventions():
    shape = (10, 64, 48)
    full = disc_stack(shape, (30, 20), 5, slices=[4])
    empty = np.zeros(shape, np.uint8)
    cap = empty_structure_cap_mm(shape, SA_SPACING_MM)
    assert cap == pytest.approx(np.sqrt(100.0**2 + 80.0**2 + 60.0**2))
    cases = [(empty, empty, SA_SPACING_MM), (full, empty, SA_SPACING_MM)]
    dice_k, hd_k = dice_hausdorff_mm_batch(cases, [3, 1])
    np.testing.assert_array_equal(dice_k, [[1.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(hd_k, [[0.0, 0.0], [cap, 0.0]])
    assert pseudo_scores(empty, full, SA_SPACING_MM, [3]) == (0.0, pytest.approx(cap))


def test_single_slice_stack_is_scored_in_2d():
    rng = np.random.default_rng(3)
    a, b = heart(rng, (1, 48, 48)), heart(rng, (1, 48, 48))
    expected = monai_hausdorff(a[0], b[0], (1.3, 0.9), [1, 2, 3])
    np.testing.assert_allclose(hausdorff_mm(a, b, (8.0, 1.3, 0.9), [1, 2, 3]), expected, atol=1e-4)
    np.testing.assert_allclose(hausdorff_mm(a[0], b[0], (1.3, 0.9), [1, 2, 3]), expected, atol=1e-4)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("percentile", [None, 95.0])
def test_matches_monai_on_random_blobs(seed, percentile):
    rng = np.random.default_rng(seed)
    ndim = 2 + seed % 2
    shape = tuple(rng.integers(4, 28, size=ndim))
    spacing = tuple(rng.uniform(0.4, 9.0, size=ndim))
    a, b = blobs(rng, shape), blobs(rng, shape)
    expected = monai_hausdorff(a, b, spacing, [1, 2, 3], percentile)
    ours = hausdorff_mm(a, b, spacing, [1, 2, 3], percentile)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(9, 56, 52), (60, 64)])
@pytest.mark.parametrize("percentile", [None, 95.0])
def test_matches_monai_on_heart_shapes(shape, percentile):
    rng = np.random.default_rng(len(shape))
    spacing = (8.0, 1.37, 1.37)[-len(shape) :]
    pred = heart(rng, shape)
    recon = heart(rng, shape)
    pred[..., 2:5, 2:6] = 3  # a spurious blob far from the heart
    cases = [(pred, recon, spacing), (recon, pred, spacing)]
    _, ours = dice_hausdorff_mm_batch(cases, [1, 2, 3], percentile, n_threads=2)
    for (a, b, _), row in zip(cases, ours):
        np.testing.assert_allclose(row, monai_hausdorff(a, b, spacing, [1, 2, 3], percentile), atol=1e-4)


def test_pseudo_scores_average_the_chosen_classes():
    rng = np.random.default_rng(5)
    pred, recon = heart(rng, (5, 40, 40)), heart(rng, (5, 40, 40))
    dice_k, hd_k = dice_hausdorff_mm_batch([(pred, recon, SA_SPACING_MM)], [1, 2, 3])
    assert pseudo_scores(pred, recon, SA_SPACING_MM, [3]) == (dice_k[0, 2], hd_k[0, 2])
    pdc, phd = pseudo_scores(pred, recon, SA_SPACING_MM, [1, 2, 3])
    assert (pdc, phd) == pytest.approx((dice_k.mean(), hd_k.mean()))


def test_batch_is_independent_of_threads_and_order():
    rng = np.random.default_rng(6)
    shapes = [(4, 30, 36), (40, 44), (7, 32, 32)] * 3
    cases = [(heart(rng, s), heart(rng, s), (6.0, 1.1, 1.2)) for s in shapes]
    one = pseudo_scores_batch(cases, [1, 2, 3], n_threads=1)
    two = pseudo_scores_batch(cases, [1, 2, 3], n_threads=2)
    singles = np.array([pseudo_scores(*case, [1, 2, 3]) for case in cases]).T
    np.testing.assert_array_equal(one, two)
    np.testing.assert_allclose(one, singles, rtol=0, atol=1e-12)


def test_rejects_bad_inputs():
    a = np.zeros((3, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        hausdorff_mm(a, a[:, :4], SA_SPACING_MM, [3])
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_mm(a, a, (1.0, 0.0, 1.0), [3])
    with pytest.raises(ValueError, match="percentile"):
        hausdorff_mm(a, a, SA_SPACING_MM, [3], percentile=0)


@pytest.mark.parametrize("method", ["window", "cdist"])
@pytest.mark.parametrize("percentile", [None, 95.0])
def test_torch_path_equals_cpu_path(percentile, method):
    rng = np.random.default_rng(7)
    stacks = [heart(rng, (6, 36, 40)) for _ in range(4)]
    stacks[3] = np.zeros_like(stacks[3])  # empty prediction: cap
    stacks[0][1, 30:33, 2:5] = 3  # a spurious blob far from the heart
    recons = [heart(rng, (6, 36, 40)) for _ in range(4)]
    spacing = np.array([[10.0, 1.25, 1.25], [8.0, 1.4, 1.3], [10.0, 0.9, 0.9], [6.0, 1.0, 1.0]])
    cases = list(zip(stacks, recons, spacing))
    expected = dice_hausdorff_mm_batch(cases, [1, 2, 3], percentile)
    got = dice_hausdorff_mm_torch(
        torch.from_numpy(np.stack(stacks)), torch.from_numpy(np.stack(recons)), torch.from_numpy(spacing),
        [1, 2, 3], percentile, method=method, max_chunk_elements=1 << 21,
    )
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have.numpy(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["window", "cdist"])
def test_torch_path_single_slices_and_empties(method):
    rng = np.random.default_rng(8)
    pred = np.stack([heart(rng, (40, 44)) for _ in range(3)] + [np.zeros((40, 44), np.uint8)])
    recon = np.stack([heart(rng, (40, 44)) for _ in range(3)] + [np.zeros((40, 44), np.uint8)])
    spacing = (10.0, 1.5, 1.2)
    expected = pseudo_scores_batch(list(zip(pred, recon, [spacing] * 4)), [1, 2, 3], 95.0)
    got = pseudo_scores_torch(
        torch.from_numpy(pred[:, None]), torch.from_numpy(recon[:, None]), spacing, [1, 2, 3], 95.0,
        method=method,
    )
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have.numpy(), want, rtol=0, atol=1e-4)
    assert got[0][3] == 1.0 and got[1][3] == 0.0
