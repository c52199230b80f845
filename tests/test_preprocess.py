"""Preprocessing and its exact inverse; the per-site cache of preprocessed cases."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedqc.core.errors import ConfigError
from fedqc.data.cache import load_preprocessed
from fedqc.data.mnms2 import Case
from fedqc.data.nifti import Volume, load_image, load_label, save_label
from fedqc.data.preprocess import (
    Geometry,
    PreprocessSpec,
    crop_centre_px,
    heart_centre_px,
    preprocess_image,
    preprocess_label,
    restore_labels,
    restore_probabilities,
)


def heart(shape, spacing_mm, centre_mm=None) -> np.ndarray:
    """LV disc inside a myocardial ring, RV crescent beside it, on every slice."""
    nx, ny, nz = shape
    x, y = np.meshgrid(np.arange(nx) * spacing_mm[0], np.arange(ny) * spacing_mm[1], indexing="ij")
    cx, cy = centre_mm or (nx * spacing_mm[0] / 2 + 4, ny * spacing_mm[1] / 2 - 3)
    r = np.hypot(x - cx, y - cy)
    plane = np.zeros((nx, ny), np.uint8)
    plane[(np.hypot(x - cx - 28, y - cy) < 17) & (r >= 24)] = 3
    plane[r < 24] = 2
    plane[r < 17] = 1
    return np.repeat(plane[:, :, None], nz, axis=2)


def volume(labels, spacing_mm, affine=None) -> Volume:
    rng = np.random.default_rng(0)
    array = (labels * 90.0 + 20 + rng.random(labels.shape) * 10).astype(np.float32)
    affine = np.diag([*spacing_mm, 1.0]) if affine is None else affine
    return Volume(array, affine, nib.Nifti1Header(), tuple(spacing_mm), Path("mem.nii.gz"))


def dice(a, b, c) -> float:
    a, b = a == c, b == c
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_output_shape_axes_and_identity_round_trip():
    labels = heart((100, 90, 3), (1.25, 1.25, 8.0))
    vol = volume(labels, (1.25, 1.25, 8.0))
    slices, geo = preprocess_image(vol, PreprocessSpec(spacing_mm=1.25, size_px=128))
    assert slices.shape == (3, 128, 128) and slices.dtype == np.float32
    sx, sy = geo.crop_start_px
    # output axis 1 is X, axis 2 is Y: voxel (x, y, k) lands at [k, x - start_x, y - start_y]
    out = preprocess_label(labels, geo)
    np.testing.assert_array_equal(out[1, 10 - sx : 90 - sx, 5 - sy : 85 - sy],
                                  labels[10:90, 5:85, 1])
    back = restore_labels(out, geo)
    assert back.shape == labels.shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("spacing_mm,shape", [((0.8, 1.1, 8.0), (200, 150, 3)),
                                              ((1.7, 1.7, 10.0), (91, 80, 2))])
def test_resampled_round_trip_dice(spacing_mm, shape):
    labels = heart(shape, spacing_mm)
    spec = PreprocessSpec(spacing_mm=1.25, size_px=128)
    slices, geo = preprocess_image(volume(labels, spacing_mm), spec, heart_centre_px(labels))
    assert geo.zoom == pytest.approx((1.25 / spacing_mm[0], 1.25 / spacing_mm[1]))
    back = restore_labels(preprocess_label(labels, geo), geo)
    assert back.shape == shape
    for c in (1, 2, 3):
        assert dice(back, labels, c) > 0.95


def test_physical_size_preserved_by_resampling():
    labels = heart((200, 150, 1), (0.8, 0.8, 8.0))
    _, geo = preprocess_image(volume(labels, (0.8, 0.8, 8.0)), PreprocessSpec(1.6, 128))
    out = preprocess_label(labels, geo)
    area_mm2 = np.sum(labels == 1) * 0.8**2
    assert np.sum(out == 1) * 1.6**2 == pytest.approx(area_mm2, rel=0.03)


def test_small_crop_restores_background_outside():
    labels = heart((160, 160, 2), (1.0, 1.0, 8.0))
    vol = volume(labels, (1.0, 1.0, 8.0))
    _, geo = preprocess_image(vol, PreprocessSpec(1.0, 32))
    back = restore_labels(preprocess_label(labels, geo), geo)
    assert back.shape == labels.shape
    sx, sy = geo.crop_start_px
    inside = np.zeros(labels.shape, bool)
    inside[sx : sx + 32, sy : sy + 32] = True
    np.testing.assert_array_equal(back[inside], labels[inside])
    assert not back[~inside].any()


def test_heart_crop_keeps_an_off_centre_heart():
    labels = heart((200, 200, 1), (1.0, 1.0, 8.0), centre_mm=(30.0, 170.0))
    vol = volume(labels, (1.0, 1.0, 8.0))
    spec = PreprocessSpec(1.0, 96, crop="heart")
    centre = crop_centre_px(spec, labels)
    assert centre is not None and abs(centre[0] - 34) < 6 and abs(centre[1] - 170) < 6
    _, geo = preprocess_image(vol, spec, centre)
    assert geo.crop_start_px[0] < 0  # the crop reaches past the image edge: padded
    np.testing.assert_array_equal(restore_labels(preprocess_label(labels, geo), geo), labels)
    _, centred = preprocess_image(vol, PreprocessSpec(1.0, 96))
    assert dice(restore_labels(preprocess_label(labels, centred), centred), labels, 1) == 0


def test_heart_centre_known_answer():
    labels = np.zeros((9, 9, 2), np.uint8)
    labels[3, 5, 0] = 3
    labels[3, 7, 1] = 1
    assert heart_centre_px(labels) == (3.0, 6.0)
    assert heart_centre_px(np.zeros((4, 4, 1))) is None
    assert crop_centre_px(PreprocessSpec(crop="centre"), labels) is None


def test_restore_probabilities_matches_argmax_labels():
    labels = heart((120, 110, 2), (1.1, 1.3, 8.0))
    _, geo = preprocess_image(volume(labels, (1.1, 1.3, 8.0)), PreprocessSpec())
    out = preprocess_label(labels, geo)
    probs = np.eye(4, dtype=np.float32)[out].transpose(0, 3, 1, 2) * 0.6 + 0.1  # softened
    assert np.allclose(probs.sum(axis=1), 1)
    restored = restore_probabilities(probs, geo)
    np.testing.assert_array_equal(restored, restore_labels(out, geo))
    with pytest.raises(ValueError):
        restore_probabilities(probs[:1], geo)


def test_zscore_and_percentile_normalisation():
    labels = heart((128, 128, 2), (1.25, 1.25, 8.0))
    vol = volume(labels, (1.25, 1.25, 8.0))
    z, _ = preprocess_image(vol, PreprocessSpec(size_px=128))
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    p, _ = preprocess_image(vol, PreprocessSpec(size_px=128, normalise="percentile"))
    assert p.min() >= -0.02 and p.max() <= 1.02 and p.max() > 0.9


@pytest.mark.parametrize("normalise", ["zscore", "percentile"])
def test_constant_image_is_finite(normalise):
    vol = Volume(np.full((40, 40, 2), 7.0, np.float32), np.eye(4), nib.Nifti1Header(),
                 (1.0, 1.0, 8.0), Path("c.nii"))
    slices, _ = preprocess_image(vol, PreprocessSpec(size_px=64, normalise=normalise))
    assert np.all(np.isfinite(slices)) and np.all(slices == 0)


def test_geometry_json_round_trip():
    _, geo = preprocess_image(volume(heart((91, 80, 2), (1.7, 1.7, 8.0)), (1.7, 1.7, 8.0)),
                              PreprocessSpec())
    assert Geometry.from_dict(json.loads(json.dumps(geo.to_dict()))) == geo
    with pytest.raises(ValueError):
        Geometry.from_dict({"zoom": [1, 1]})


@pytest.mark.parametrize("kwargs", [{"spacing_mm": 0}, {"size_px": 4}, {"crop": "lv"},
                                    {"normalise": "minmax"}])
def test_spec_validation(kwargs):
    with pytest.raises(ConfigError):
        PreprocessSpec(**kwargs)


def write_case(folder: Path, spacing_mm=(1.4, 1.4, 9.0)) -> Case:
    affine = np.diag([*spacing_mm, 1.0])
    affine[:3, 3] = [-70.0, 20.0, 5.0]
    labels = heart((100, 96, 3), spacing_mm)
    image = volume(labels, spacing_mm).array
    nib.save(nib.Nifti1Image(image, affine), folder / "005_SA_ED.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), folder / "005_SA_ED_gt.nii.gz")
    return Case("005", "SA", "ED", folder / "005_SA_ED.nii.gz", folder / "005_SA_ED_gt.nii.gz")


def test_saved_prediction_overlays_the_image(tmp_path):
    case = write_case(tmp_path)
    vol = load_image(case.image)
    labels = load_label(case.label, vol)
    _, geo = preprocess_image(vol, PreprocessSpec())
    prediction = restore_labels(preprocess_label(labels, geo), geo)
    out = save_label(tmp_path / "005_SA_ED_pred.nii.gz", prediction, vol)
    img = nib.load(out)
    assert np.allclose(img.affine, vol.affine) and img.shape == vol.shape
    for c in (1, 2, 3):
        assert dice(np.asarray(img.dataobj), labels, c) > 0.95


def test_cache_reuses_and_invalidates(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    case = write_case(data)
    spec = PreprocessSpec(size_px=64, crop="heart")
    first = load_preprocessed(case, spec, cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 2 and entries[0].startswith("005_SA_ED-")
    second = load_preprocessed(case, spec, cache)
    np.testing.assert_array_equal(second.image, first.image)
    np.testing.assert_array_equal(second.label, first.label)
    assert second.geometry == first.geometry
    stat = case.image.stat()
    os.utime(case.image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # image edited
    load_preprocessed(case, spec, cache)
    assert len(list(cache.iterdir())) == 2 and sorted(p.name for p in cache.iterdir()) != entries


def test_cache_recomputes_a_corrupt_entry(tmp_path):
    case = write_case(tmp_path)
    spec = PreprocessSpec(size_px=64)
    first = load_preprocessed(case, spec, tmp_path / "cache")
    npz = next((tmp_path / "cache").glob("*.npz"))
    npz.write_bytes(b"garbage")
    again = load_preprocessed(case, spec, tmp_path / "cache")
    np.testing.assert_array_equal(again.image, first.image)
    assert np.load(npz)["image"].shape == (3, 64, 64)
