"""Tests of the multi-centre cine-MRI simulator (fedqc.data.simulator), on the tiny preset."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from fedqc.core.errors import ConfigError, DataError
from fedqc.data.simulator import (
    DISEASES,
    PRESETS,
    get_preset,
    preset_table,
    simulate_dataset,
)
from fedqc.data.simulator.presets import LABELLED_DISEASES
from fedqc.data.simulator.scanner import sample_protocol
from fedqc.data.simulator.subject import simulate_subject

FILES = [f"{view}_{phase}{gt}.nii.gz" for view in ("SA", "LA") for phase in ("ED", "ES") for gt in ("", "_gt")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset at its defaults."""
    out = tmp_path_factory.mktemp("sim") / "tiny"
    simulate_dataset(out, "tiny", seed=3, progress=None)
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_tiny_preset_stays_small(tiny: Path) -> None:
    """What keeps the tests that simulate it fast: few subjects, small matrices, few slices."""
    subjects = [p for p in tiny.iterdir() if p.is_dir()]
    assert len(subjects) <= 6
    for folder in subjects:
        for view in ("SA", "LA"):
            shape = nib.load(folder / f"{folder.name}_{view}_ED.nii.gz").shape
            assert max(shape[:2]) <= 80 and shape[2] <= 6, (folder.name, view, shape)


def test_layout_and_csv_match_subject_folders(tiny: Path) -> None:
    root = tiny
    rows = _read_csv(root / "dataset_information.csv")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    n = PRESETS["tiny"].subjects_per_centre * len(PRESETS["tiny"].centres)
    assert folders == [f"{i:03d}" for i in range(1, n + 1)]
    assert [r["SUBJECT_CODE"] for r in rows] == folders
    for code in folders:
        assert sorted(p.name for p in (root / code).iterdir()) == sorted(f"{code}_{f}" for f in FILES)
    assert {"SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD", "CENTRE"} <= set(rows[0])
    assert {r["DISEASE"] for r in rows} <= set(DISEASES)
    assert {r["CENTRE"] for r in rows} == {"1", "2"}
    for r in rows:
        if r["SIM_LABELLED_INTENT"] == "True":
            assert r["DISEASE"] in LABELLED_DISEASES


def test_volumes_read_back_with_sane_geometry_and_labels(tiny: Path) -> None:
    root = tiny
    rv_fractions = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for view in ("SA", "LA"):
            for phase in ("ED", "ES"):
                image = nib.load(folder / f"{folder.name}_{view}_{phase}.nii.gz")
                label = nib.load(folder / f"{folder.name}_{view}_{phase}_gt.nii.gz")
                img, lab = np.asarray(image.dataobj), np.asarray(label.dataobj)
                assert img.dtype == np.int16 and lab.dtype == np.uint8
                assert img.shape == lab.shape and img.ndim == 3
                assert img.min() >= 0 and img.max() > 100
                assert set(np.unique(lab)) <= {0, 1, 2, 3}
                np.testing.assert_allclose(image.affine, label.affine)
                voxel_mm = np.linalg.norm(image.affine[:3, :3], axis=0)
                np.testing.assert_allclose(image.header.get_zooms(), voxel_mm, rtol=1e-5)
                assert voxel_mm[0] == pytest.approx(voxel_mm[1]) and 1.0 <= voxel_mm[0] <= 2.5
                if view == "LA":
                    assert img.shape[2] == 1 and 6.0 <= voxel_mm[2] <= 9.0
                    assert {1, 2, 3} <= set(np.unique(lab)), "LA shows LV, myocardium and RV"
                else:
                    assert 5 <= img.shape[2] <= 12 and 8.0 <= voxel_mm[2] <= 25.0
                    rv_fractions.append(np.mean([(lab[:, :, k] == 3).any() for k in range(lab.shape[2])]))
    assert np.mean(rv_fractions) > 0.6, "the RV should be in most short-axis slices"


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    a = simulate_dataset(tmp_path / "a", "tiny", subjects_per_centre=1, seed=5, progress=None)
    b = simulate_dataset(tmp_path / "b", "tiny", subjects_per_centre=1, seed=5, progress=None)
    c = simulate_dataset(tmp_path / "c", "tiny", subjects_per_centre=1, seed=6, progress=None)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    sa = Path("001") / "001_SA_ED.nii.gz"
    first, other = np.asarray(nib.load(a / sa).dataobj), np.asarray(nib.load(c / sa).dataobj)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_preview_is_a_picture(tiny: Path) -> None:
    picture = matplotlib.image.imread(tiny / "preview.png")
    assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 600
    assert picture[..., :3].std() > 0.05  # not blank


def test_shifted_centre_has_flatter_blood_myocardium_contrast(tiny: Path) -> None:
    root = tiny
    ratios: dict[str, list[float]] = {"1": [], "2": []}
    for row in _read_csv(root / "dataset_information.csv"):
        code = row["SUBJECT_CODE"]
        img = np.asarray(nib.load(root / code / f"{code}_SA_ED.nii.gz").dataobj).astype(float)
        lab = np.asarray(nib.load(root / code / f"{code}_SA_ED_gt.nii.gz").dataobj)
        ratios[row["CENTRE"]].append(np.median(img[lab == 1]) / np.median(img[lab == 2]))
    assert min(ratios["1"]) > max(ratios["2"])


def test_end_systole_has_smaller_cavities(tiny: Path) -> None:
    root = tiny
    for folder in (p for p in root.iterdir() if p.is_dir()):
        counts = {}
        for phase in ("ED", "ES"):
            lab = np.asarray(nib.load(folder / f"{folder.name}_SA_{phase}_gt.nii.gz").dataobj)
            counts[phase] = ((lab == 1).sum(), (lab == 3).sum())
        assert counts["ES"][0] < counts["ED"][0] and counts["ES"][1] < counts["ED"][1], folder.name


def _volume_ml(subject, label: int) -> float:
    voxel_mm3 = abs(np.linalg.det(subject.affines["SA"][:3, :3]))
    return float((subject.labels[("SA", "ED")] == label).sum() * voxel_mm3 / 1000)


def test_pathologies_change_the_heart_as_expected() -> None:
    centre = PRESETS["tiny"].centres[0]
    normal, drv, hcm = (simulate_subject(np.random.default_rng(11), d, centre, depths=1) for d in ("NOR", "DRV", "HCM"))
    assert normal.protocol == drv.protocol == hcm.protocol, "the scanner does not depend on the disease"
    assert _volume_ml(drv, 3) > 1.3 * _volume_ml(normal, 3)
    assert _volume_ml(hcm, 2) / _volume_ml(hcm, 1) > 1.5 * _volume_ml(normal, 2) / _volume_ml(normal, 1)


def test_presets_are_plain_data_with_m_and_ms2_disease_split() -> None:
    rows = preset_table("consortium")
    assert len(rows) == 4 and len({r["vendor"] for r in rows}) == 3
    assert sum(r["labelled"] for r in rows) == 2
    for r in rows:
        assert isinstance(r["severity"], tuple) and isinstance(r["appearance_snr"], float)
        has_rv_only_diseases = {"TRI", "DRV"} <= set(r["diseases"])
        assert has_rv_only_diseases == (not r["labelled"])
    assert set(PRESETS) >= {"consortium", "quickstart", "tiny"}


def test_shift_strength_moves_shifted_centres_only() -> None:
    labelled, shifted = get_preset("consortium").centres[0], get_preset("consortium").centres[3]

    def ratio(centre, strength: float) -> float:
        p = sample_protocol(centre, np.random.default_rng(0), strength)
        return p.contrast["blood"] / p.contrast["myocardium"]

    assert ratio(labelled, 0.0) == ratio(labelled, 2.0)
    assert ratio(shifted, 0.0) > ratio(shifted, 1.0) > ratio(shifted, 2.0)
    assert sample_protocol(shifted, np.random.default_rng(0), 0.0).severity == 0.0
    assert get_preset("consortium", shift_strength=0.5).shift_strength == 0.5


def test_bad_arguments_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="preset"):
        simulate_dataset(tmp_path / "x", "no-such-preset", progress=None)
    with pytest.raises(ConfigError, match="subjects_per_centre"):
        simulate_dataset(tmp_path / "x", "tiny", subjects_per_centre=0, progress=None)
    with pytest.raises(ConfigError, match="shift_strength"):
        simulate_dataset(tmp_path / "x", "tiny", shift_strength=-1.0, progress=None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="not an empty folder"):
        simulate_dataset(tmp_path / "full", "tiny", progress=None)
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"


def test_progress_reports_each_centre(tmp_path: Path) -> None:
    messages: list[str] = []
    simulate_dataset(tmp_path / "p", "tiny", subjects_per_centre=1, progress=messages.append)
    assert sum(m.startswith("centre ") for m in messages) == len(PRESETS["tiny"].centres)
    assert not list(tmp_path.glob(".*partial"))


def _volume_ml_at(subject, label: int, phase: str) -> float:
    voxel_mm3 = abs(np.linalg.det(subject.affines["SA"][:3, :3]))
    return float((subject.labels[("SA", phase)] == label).sum() * voxel_mm3 / 1000)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hcm_keeps_a_right_ventricle_at_end_systole_in_both_views(seed: int) -> None:
    """A thick HCM septum once filled the RV at ES (RV ejection fraction 0.8-0.98, LA slices with no
    RV): the RV now wraps the septum as it is, and the four-chamber plan cuts every structure."""
    from fedqc.data.simulator.subject import LA_MIN_AREA_MM2

    centre = PRESETS["quickstart"].centres[0]
    hcm = simulate_subject(np.random.default_rng([0, 1, seed]), "HCM", centre, depths=1)
    rv_ef = 1.0 - _volume_ml_at(hcm, 3, "ES") / _volume_ml_at(hcm, 3, "ED")
    assert 0.3 < rv_ef < 0.7, f"RV ejection fraction {rv_ef:.2f}"
    pixel_mm2 = float(np.prod(np.linalg.norm(hcm.affines["LA"][:3, :2], axis=0)))
    for phase in ("ED", "ES"):
        areas = [(hcm.labels[("LA", phase)] == k).sum() * pixel_mm2 for k in (1, 2, 3)]
        assert min(areas) >= LA_MIN_AREA_MM2, (phase, areas)


def test_data_from_another_simulator_version_is_named(tiny: Path, tmp_path: Path) -> None:
    from fedqc.data.simulator import SIMULATOR_VERSION, stale_simulation

    assert stale_simulation(tiny) is None
    old = tmp_path / "old"
    old.mkdir()
    (old / "dataset_information.csv").write_text((tiny / "dataset_information.csv").read_text())
    message = stale_simulation(old)  # no stamp: written before the stamp existed
    assert message and "version 1" in message and f"version {SIMULATOR_VERSION}" in message
    (old / "simulator.json").write_text("{not json")
    assert "cannot be read" in stale_simulation(old)
