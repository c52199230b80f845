"""NIfTI loading and saving: round trips on tiny files; every bad input is a DataError naming it."""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedqc.core.errors import DataError
from fedqc.data.nifti import (
    ACDC_REMAP,
    Volume,
    load_image,
    load_label,
    save_image,
    save_label,
)

AFFINE = np.array([[1.5, 0, 0, -40.0], [0, 1.5, 0, 12.5], [0, 0, 8.0, 3.0], [0, 0, 0, 1]])


def write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def image_array(shape=(6, 5, 3)) -> np.ndarray:
    return np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)


def label_array(shape=(6, 5, 3)) -> np.ndarray:
    return (np.arange(np.prod(shape)) % 4).reshape(shape).astype(np.uint8)


def with_pixdim(path: Path, axis: int, value: float) -> Path:
    """Patch pixdim[axis] in an uncompressed .nii (nibabel would fix it on save)."""
    raw = bytearray(path.read_bytes())
    raw[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    return path


def test_load_image_round_trip(tmp_path):
    data = image_array()
    vol = load_image(write(tmp_path / "a.nii.gz", data))
    assert vol.array.dtype == np.float32 and vol.shape == (6, 5, 3)
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.affine, AFFINE)
    assert vol.spacing_mm == (1.5, 1.5, 8.0)
    assert vol.path == tmp_path / "a.nii.gz"


def test_2d_file_becomes_single_slice(tmp_path):
    vol = load_image(write(tmp_path / "la.nii.gz", image_array((6, 5))))
    assert vol.shape == (6, 5, 1)
    assert vol.spacing_mm[:2] == (1.5, 1.5)


def test_singleton_4d_is_squeezed(tmp_path):
    vol = load_image(write(tmp_path / "a.nii.gz", image_array((6, 5, 3, 1))))
    assert vol.shape == (6, 5, 3)


def test_cine_4d_is_refused(tmp_path):
    path = write(tmp_path / "001_SA_CINE.nii.gz", image_array((6, 5, 3, 4)))
    with pytest.raises(DataError, match="3D was expected") as info:
        load_image(path)
    assert "001_SA_CINE.nii.gz" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        load_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value)


def test_corrupt_gzip_bytes(tmp_path):
    path = write(tmp_path / "bad.nii.gz", image_array((20, 20, 4)) * 1.37)
    raw = bytearray(path.read_bytes())
    raw[40:80] = bytes(40)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="bad.nii.gz"):
        load_image(path)


def test_truncated_gzip(tmp_path):
    rng = np.random.default_rng(0)
    path = write(tmp_path / "cut.nii.gz", rng.random((30, 30, 8)).astype(np.float32))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.nii.gz"):
        load_image(path)


def test_truncated_uncompressed(tmp_path):
    path = write(tmp_path / "cut.nii", image_array((20, 20, 4)))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated") as info:
        load_image(path)
    assert "cut.nii" in str(info.value)


def test_not_a_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"patient notes, definitely not an image" * 20))
    with pytest.raises(DataError, match="notes.nii.gz"):
        load_image(path)


def test_wrong_suffix(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match="expected .nii or .nii.gz"):
        load_image(path)


def test_nan_voxels_are_counted(tmp_path):
    data = image_array()
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    with pytest.raises(DataError, match="2 of 90 voxels are NaN or Inf"):
        load_image(write(tmp_path / "nan.nii.gz", data))


def test_all_zero_image(tmp_path):
    with pytest.raises(DataError, match="all zero"):
        load_image(write(tmp_path / "zero.nii.gz", np.zeros((4, 4, 2), np.float32)))


@pytest.mark.parametrize("value", [0.0, -1.2, float("nan")])
def test_bad_spacing_in_pixdim(tmp_path, value):
    path = with_pixdim(write(tmp_path / "sp.nii", image_array()), axis=2, value=value)
    with pytest.raises(DataError, match="spacing") as info:
        load_image(path)
    assert "sp.nii" in str(info.value)


def test_label_round_trip_keeps_geometry(tmp_path):
    vol = load_image(write(tmp_path / "img.nii.gz", image_array()))
    labels = label_array()
    out = save_label(tmp_path / "pred.nii.gz", labels, vol)
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, vol.affine)
    assert int(img.header["sform_code"]) == int(vol.header["sform_code"])
    assert int(img.header["qform_code"]) == int(vol.header["qform_code"])
    assert img.dataobj.slope == 1 and img.dataobj.inter == 0
    np.testing.assert_array_equal(load_label(out, vol), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz", "pred.nii.gz"]  # no temp


def test_save_label_on_2d_reference_stays_2d(tmp_path):
    vol = load_image(write(tmp_path / "la.nii.gz", image_array((6, 5))))
    out = save_label(tmp_path / "la_pred.nii.gz", label_array((6, 5, 1)), vol)
    assert nib.load(out).shape == (6, 5)
    assert load_label(out, vol).shape == (6, 5, 1)


def test_save_label_overwrites_atomically(tmp_path):
    vol = load_image(write(tmp_path / "img.nii.gz", image_array()))
    target = save_label(tmp_path / "pred.nii.gz", np.zeros((6, 5, 3), np.uint8), vol)
    save_label(target, label_array(), vol)
    np.testing.assert_array_equal(load_label(target, vol), label_array())
    with pytest.raises(ValueError):
        save_label(target, label_array((6, 5, 2)), vol)
    np.testing.assert_array_equal(load_label(target, vol), label_array())  # earlier result kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz", "pred.nii.gz"]


def test_save_image_reference_grid(tmp_path):
    vol = load_image(write(tmp_path / "img.nii", image_array()))
    out = save_image(tmp_path / "prob.nii", vol.array / 2, vol)
    again = load_image(out)
    np.testing.assert_allclose(again.array, vol.array / 2)
    np.testing.assert_allclose(again.affine, vol.affine)


def test_label_shape_mismatch_names_both_shapes(tmp_path):
    vol = load_image(write(tmp_path / "img.nii.gz", image_array()))
    path = write(tmp_path / "lab.nii.gz", label_array((6, 5, 2)))
    with pytest.raises(DataError, match=r"\(6, 5, 2\).*\(6, 5, 3\)") as info:
        load_label(path, vol)
    assert "lab.nii.gz" in str(info.value)


def test_label_affine_mismatch(tmp_path):
    vol = load_image(write(tmp_path / "img.nii.gz", image_array()))
    moved = AFFINE.copy()
    moved[0, 3] += 1.5
    with pytest.raises(DataError, match="affine"):
        load_label(write(tmp_path / "lab.nii.gz", label_array(), moved), vol)


def test_label_value_5_points_to_remap(tmp_path):
    vol = load_image(write(tmp_path / "img.nii.gz", image_array()))
    labels = label_array()
    labels[0, 0, 0] = 5
    with pytest.raises(DataError, match=r"\[5\].*remap") as info:
        load_label(write(tmp_path / "lab.nii.gz", labels), vol)
    assert "lab.nii.gz" in str(info.value)


def test_fractional_label_values(tmp_path):
    vol = load_image(write(tmp_path / "img.nii.gz", image_array()))
    labels = label_array().astype(np.float32)
    labels[0, 0, 0] = 1.5
    with pytest.raises(DataError, match="integers"):
        load_label(write(tmp_path / "lab.nii.gz", labels), vol)


def test_acdc_remap_swaps_lv_and_rv(tmp_path):
    vol = load_image(write(tmp_path / "img.nii.gz", image_array()))
    acdc = np.array([0, 1, 2, 3] * 22 + [0, 1], np.uint8).reshape(6, 5, 3)  # 1 RV, 3 LV
    got = load_label(write(tmp_path / "lab.nii.gz", acdc), vol, remap=ACDC_REMAP)
    np.testing.assert_array_equal(got[acdc == 1], 3)
    np.testing.assert_array_equal(got[acdc == 3], 1)
    np.testing.assert_array_equal(got[acdc == 2], 2)


def test_remap_can_fix_out_of_range_values(tmp_path):
    vol = load_image(write(tmp_path / "img.nii.gz", image_array()))
    labels = label_array().astype(np.int16) * 100  # 0, 100, 200, 300
    got = load_label(write(tmp_path / "lab.nii.gz", labels), vol,
                     remap={100: 1, 200: 2, 300: 3})
    np.testing.assert_array_equal(got, label_array())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=600), kind=st.sampled_from(["plain", "gz-name", "gzipped"]))
def test_random_bytes_only_raise_data_error(raw, kind):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("x.nii" if kind == "plain" else "x.nii.gz")
        path.write_bytes(gzip.compress(raw) if kind == "gzipped" else raw)
        with pytest.raises(DataError):
            load_image(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int16, np.uint8]),
        shape=hnp.array_shapes(min_dims=1, max_dims=5, min_side=1, max_side=4),
    ),
    zoom=st.floats(min_value=0.1, max_value=10.0),
)
def test_random_arrays_load_or_raise_data_error(data, zoom):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "x.nii.gz", data, np.diag([zoom, zoom, 2.0, 1.0]))
        try:
            vol = load_image(path)
        except DataError:
            return
        assert isinstance(vol, Volume) and vol.array.ndim == 3
        assert np.all(np.isfinite(vol.array)) and np.any(vol.array)
        assert all(s > 0 for s in vol.spacing_mm)
