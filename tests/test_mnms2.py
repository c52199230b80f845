"""Case discovery in the three layouts, the metadata CSV, filters and subject-wise splits."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedqc.core.errors import ConfigError, DataError
from fedqc.data.mnms2 import (
    Case,
    discover_cases,
    filter_cases,
    read_metadata,
    split_cases,
    subject_key,
)

CSV = """SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD,CENTRE
1,NOR,SIEMENS,Avanto,1.5,1
002,DLV,Philips,Achieva,3,2
3,HCM,GE,Signa,1.50,3
"""


def nifti(path: Path, shape=(4, 4, 2)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
    return path


def mnms2_site(root: Path, subjects=("001", "002", "003"), labelled=("001", "003")) -> Path:
    for s in subjects:
        for view in ("SA", "LA"):
            for phase in ("ED", "ES"):
                nifti(root / s / f"{s}_{view}_{phase}.nii.gz")
                if s in labelled:
                    nifti(root / s / f"{s}_{view}_{phase}_gt.nii.gz")
        nifti(root / s / f"{s}_SA_CINE.nii.gz", (4, 4, 2, 3))
    (root / "dataset_information.csv").write_text(CSV)
    return root


def test_mnms2_layout(tmp_path):
    cases = discover_cases(mnms2_site(tmp_path))
    assert len(cases) == 12  # 3 subjects x 2 views x 2 phases, CINE ignored
    assert [c.case_id for c in cases[:4]] == ["001_SA_ED", "001_SA_ES", "001_LA_ED", "001_LA_ES"]
    first = cases[0]
    assert first.image == tmp_path / "001" / "001_SA_ED.nii.gz"
    assert first.label == tmp_path / "001" / "001_SA_ED_gt.nii.gz"
    assert all(c.label is None for c in cases if c.subject == "002")
    assert first.meta["VENDOR"] == "SIEMENS" and first.meta["SUBJECT_CODE"] == "001"


def test_view_and_phase_selection(tmp_path):
    cases = discover_cases(mnms2_site(tmp_path), views=["LA"], phases=["ES"])
    assert {(c.view, c.phase) for c in cases} == {("LA", "ES")} and len(cases) == 3


def test_unknown_view_or_layout_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="views"):
        discover_cases(mnms2_site(tmp_path), views=["2CH"])
    with pytest.raises(ConfigError, match="layout"):
        discover_cases(tmp_path, layout="bids")


def test_flat_layout(tmp_path):
    nifti(tmp_path / "010_SA_ED.nii.gz")
    nifti(tmp_path / "010_SA_ED_gt.nii.gz")
    nifti(tmp_path / "010_LA_ES.nii")
    cases = discover_cases(tmp_path)
    assert [(c.case_id, c.label is not None) for c in cases] == [
        ("010_SA_ED", True), ("010_LA_ES", False)
    ]


def test_folder_layout_tokens_and_label_places(tmp_path):
    nifti(tmp_path / "patientA_LA_ES.nii.gz")
    nifti(tmp_path / "patientA_LA_ES_gt.nii.gz")
    nifti(tmp_path / "scan7.nii")
    nifti(tmp_path / "labels" / "scan7.nii")
    nifti(tmp_path / "scan8.nii.gz")
    nifti(tmp_path / "scan8_pred.nii.gz")
    cases = discover_cases(tmp_path, layout="folder")
    by_id = {c.case_id: c for c in cases}
    assert set(by_id) == {"patientA_LA_ES", "scan7_SA_ED", "scan8_SA_ED"}
    assert by_id["patientA_LA_ES"].label == tmp_path / "patientA_LA_ES_gt.nii.gz"
    assert by_id["scan7_SA_ED"].label == tmp_path / "labels" / "scan7.nii"
    assert by_id["scan8_SA_ED"].label is None


def test_auto_falls_back_to_folder(tmp_path):
    nifti(tmp_path / "heart.nii.gz")
    assert [c.case_id for c in discover_cases(tmp_path)] == ["heart_SA_ED"]


def test_duplicate_case_is_refused(tmp_path):
    nifti(tmp_path / "scan.nii")
    nifti(tmp_path / "scan.nii.gz")
    with pytest.raises(DataError, match="scan_SA_ED"):
        discover_cases(tmp_path, layout="folder")


def test_empty_folder_names_folder_and_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match="mnms2, flat, folder") as info:
        discover_cases(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover_cases(tmp_path / "site9")


def test_subject_codes_normalised():
    assert subject_key("1") == subject_key("001") == subject_key(" 001 ") == "001"
    assert subject_key("P12a") == "P12a"


def test_read_metadata_semicolons_and_bom(tmp_path):
    (tmp_path / "dataset_information.csv").write_text(
        "\ufeffSUBJECT_CODE;VENDOR\n7;GE\n", encoding="utf-8"
    )
    assert read_metadata(tmp_path) == {"007": {"SUBJECT_CODE": "007", "VENDOR": "GE"}}
    assert read_metadata(tmp_path / "nowhere") == {}


def test_read_metadata_duplicate_subject(tmp_path):
    (tmp_path / "dataset_information.csv").write_text("SUBJECT_CODE,VENDOR\n1,GE\n001,GE\n")
    with pytest.raises(DataError, match="appears twice"):
        read_metadata(tmp_path)


def test_filter_by_vendor_case_insensitive_and_numbers(tmp_path):
    cases = discover_cases(mnms2_site(tmp_path))
    assert {c.subject for c in filter_cases(cases, {"VENDOR": "siemens"})} == {"001"}
    assert {c.subject for c in filter_cases(cases, {"FIELD": 1.5})} == {"001", "003"}
    assert {c.subject for c in filter_cases(cases, {"CENTRE": [2, "3"]})} == {"002", "003"}
    assert {c.subject for c in filter_cases(cases, {"FIELD": "1.5", "CENTRE": 3})} == {"003"}
    assert filter_cases(cases, {}) == cases


def test_filter_unknown_column_lists_columns(tmp_path):
    cases = discover_cases(mnms2_site(tmp_path))
    with pytest.raises(DataError, match="'MANUFACTURER'.*VENDOR"):
        filter_cases(cases, {"MANUFACTURER": "GE"})


def test_filter_skips_subject_missing_from_csv_with_warning(tmp_path):
    root = mnms2_site(tmp_path, subjects=("001", "002", "003", "004"))
    cases = discover_cases(root)
    assert all(not c.meta for c in cases if c.subject == "004")
    with pytest.warns(UserWarning, match="004"):
        kept = filter_cases(cases, {"FIELD": [1.5, 3]})
    assert {c.subject for c in kept} == {"001", "002", "003"}


def test_filter_matching_nothing_is_an_error(tmp_path):
    cases = discover_cases(mnms2_site(tmp_path))
    with pytest.raises(DataError, match="matches no case"):
        filter_cases(cases, {"VENDOR": "Canon"})


def test_filter_without_csv(tmp_path):
    nifti(tmp_path / "010_SA_ED.nii.gz")
    with pytest.raises(DataError, match="no metadata CSV"):
        filter_cases(discover_cases(tmp_path), {"VENDOR": "GE"})


def make_cases(n_subjects: int) -> list[Case]:
    return [
        Case(f"{s:03d}", v, p, image=Path(f"{s:03d}_{v}_{p}.nii.gz"))
        for s in range(1, n_subjects + 1) for v in ("SA", "LA") for p in ("ED", "ES")
    ]


def test_split_by_subject_is_deterministic_and_disjoint():
    cases = make_cases(10)
    train, val = split_cases(cases, [0.8, 0.2], seed=3)
    assert len({c.subject for c in train}) == 8 and len({c.subject for c in val}) == 2
    assert not {c.subject for c in train} & {c.subject for c in val}
    assert len(train) + len(val) == len(cases)  # each subject's 4 cases stay together
    assert split_cases(cases, [0.8, 0.2], seed=3) == [train, val]
    seeds = {frozenset(c.subject for c in split_cases(cases, [0.5, 0.5], seed=s)[0])
             for s in range(5)}
    assert len(seeds) > 1


def test_split_counts_and_rounding():
    cases = make_cases(7)
    a, b, c = split_cases(cases, [0.5, 0.25, 0.25])
    assert [len({x.subject for x in g}) for g in (a, b, c)] == [3, 2, 2]  # largest remainder
    labelled, rest = split_cases(cases, [2, 3])
    assert len({x.subject for x in labelled}) == 2 and len({x.subject for x in rest}) == 3


@pytest.mark.parametrize("sizes", [[0.5, 0.6], [8, 0], [], [-1, 2]])
def test_split_bad_sizes(sizes):
    with pytest.raises(ConfigError, match="split"):
        split_cases(make_cases(7), sizes)
