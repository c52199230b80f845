"""Bad input found early and reported whole (issue 15, points 5, 11 and 12): a labelled site too small
for its fences, bad case files in prediction, evaluation and training, a site whose filter matches
nothing, a label convention `fedqc evaluate` cannot remap, round-log plots. Real files, real commands."""

from __future__ import annotations

import json
import shutil
import time

import nibabel as nib
import numpy as np
import pytest
import yaml

from fedqc.cli.main import main
from fedqc.config import config_from_dict, to_dict
from fedqc.config.flat import encode_value, flatten
from fedqc.core.errors import DataError
from fedqc.site.algorithm import make_site_algo
from tests.conftest import tiny_config_dict
from tests.subsets import read_csv as _read_csv
from tests.subsets import subset, truncate


def _write(tmp_path, data: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _node(root, site: str, centre, labelled: bool, work):
    return {"site-id": site, "work-dir": str(work), "root": str(root), "filter": encode_value({"CENTRE": centre}),
            "labelled": labelled, "views": "SA"}


def _run_config(root, **sections):
    settings = to_dict(config_from_dict(tiny_config_dict(root, views=["SA"], **sections)))
    settings.pop("sites")
    settings.pop("simulated", None)
    return flatten(settings)


# -- point 5: a labelled site too small for its fences ---------------------------------------------------


def test_train_refuses_too_few_validation_cases_for_labelled_val_fences_before_training(tiny_data, tmp_path,
                                                                                        capsys):
    # 8 subjects, val_fraction 0.1: 1 validation subject = 2 cases per view (ED, ES); the fences need 4.
    config = _write(tmp_path, tiny_config_dict(tiny_data, train={"val_fraction": 0.1},
                                               qc={"threshold_source": "labelled-val"}))
    run = tmp_path / "run"
    started = time.perf_counter()
    assert main(["train", "--config", str(config), "--out", str(run)]) == 2
    captured = capsys.readouterr()
    assert time.perf_counter() - started < 20  # before any preprocessing or training
    assert "qc.threshold_source" in captured.err and "centre1: 2" in captured.err and "at least 4" in captured.err
    assert "Traceback" not in captured.err and "training on" not in captured.out
    assert not run.exists()


def test_a_labelled_site_too_small_for_its_fences_is_refused_before_any_task(tiny_data, tmp_path):
    node = _node(tiny_data, "small", 1, True, tmp_path / "w")
    with pytest.raises(DataError, match=r"site 'small' SA: 2 validation case\(s\) and 0 unlabelled") as error:
        make_site_algo(node, _run_config(tiny_data, train={"val_fraction": 0.1}))
    assert "at least 4" in str(error.value)
    # With half of its archive as its own pool (4 subjects: 8 cases) the site can fit its fences.
    site = make_site_algo({**node, "unlabelled-fraction": 0.5}, _run_config(tiny_data, train={"val_fraction": 0.25}))
    assert len(site.split("SA").val) == 2 and len(site.split("SA").pool) == 8


def test_simulate_refuses_the_small_site_before_federating(tiny_data, tmp_path, capsys):
    config = _write(tmp_path, tiny_config_dict(tiny_data, train={"val_fraction": 0.1}))
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "fed")]) == 2
    err = capsys.readouterr().err
    assert "site 'centre1' SA: 2 validation case(s)" in err and "Traceback" not in err
    assert not (tmp_path / "fed").exists()


# -- point 11: one bad case does not abort the others ----------------------------------------------------


@pytest.fixture(scope="module")
def bad_prediction(trained, tiny_data, tmp_path_factory):
    """``fedqc predict`` on 3 subjects per centre (24 cases), one image truncated."""
    base = tmp_path_factory.mktemp("bad_prediction")
    data = subset(tiny_data, base / "data", 3)
    bad = truncate(data / "002" / "002_SA_ES.nii.gz")
    out = base / "pred"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["predict", "--run", str(trained[1]), "--data", str(data), "--out", str(out)])
    return code, err.getvalue(), data, bad, out


def test_predict_writes_every_other_case_and_lists_the_bad_one(bad_prediction):
    code, err, _, bad, out = bad_prediction
    assert code == 2
    assert str(bad) in err and "1 of 24 cases could not be predicted" in err and "Traceback" not in err
    assert len(list(out.glob("*_pred.nii.gz"))) == 23 and not (out / "002_SA_ES_pred.nii.gz").exists()
    rows = _read_csv(out / "qc.csv")
    assert len(rows) == 24
    failed = [r for r in rows if r["error"]]
    assert [r["case_id"] for r in failed] == ["002_SA_ES"] and str(bad) in failed[0]["error"]
    assert all(r["pdc"] for r in rows if not r["error"])
    assert "002_SA_ES" in (out / "qc.html").read_text()


def test_evaluate_scores_every_other_case_and_lists_the_bad_ones(bad_prediction, tmp_path, capsys):
    _, _, data, _, out = bad_prediction
    pred = shutil.copytree(out, tmp_path / "pred")
    broken = truncate(pred / "003_LA_ED_pred.nii.gz")
    report = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["evaluate", "--data", str(data), "--pred", str(pred), "--json", str(report)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "could not be evaluated" in err and "Traceback" not in err
    results = json.loads(report.read_text())
    assert len(results["cases"]) == 22  # 24 - the case predict could not read (no prediction) - the broken one
    assert len(results["failures"]) == 1 and str(broken) in results["failures"][0]


def test_train_lists_every_bad_file_at_once_and_touches_nothing(tiny_data, tmp_path, capsys):
    data = subset(tiny_data, tmp_path / "data", 8)
    bad = [truncate(data / "002" / "002_SA_ED.nii.gz"), truncate(data / "004" / "004_LA_ES_gt.nii.gz"),
           truncate(data / "012" / "012_SA_ES.nii.gz")]
    centres = {r["SUBJECT_CODE"]: r["CENTRE"] for r in _read_csv(data / "dataset_information.csv")}
    assert {centres["002"], centres["012"]} == {"1", "2"}  # both sites have a bad file
    config = _write(tmp_path, tiny_config_dict(data))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "3 unusable case file(s)" in err
    assert all(str(path) in err for path in bad), err
    assert not run.exists()


# -- point 12 ---------------------------------------------------------------------------------------------


def test_a_site_whose_filter_matches_nothing_is_refused_naming_the_filter(tiny_data, tmp_path):
    node = _node(tiny_data, "empty", 9, False, tmp_path / "w")
    with pytest.raises(DataError, match="CENTRE") as error:
        make_site_algo(node, _run_config(tiny_data))
    assert "9" in str(error.value) and "matches no case" in str(error.value)


def test_evaluate_does_not_suggest_a_remap_option_it_lacks(trained, tiny_data, tmp_path, capsys):
    data = subset(tiny_data, tmp_path / "data", 2)
    out = tmp_path / "pred"
    # Labels stored as ACDC does (1 RV, 3 LV) are still in 0..3; a 0/100/200/300 convention is not.
    label = data / "001" / "001_SA_ED_gt.nii.gz"
    img = nib.load(label)
    header = img.header.copy()
    header.set_data_dtype(np.int16)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16) * 100, img.affine, header), label)
    assert main(["predict", "--run", str(trained[1]), "--data", str(data), "--out", str(out),
                 "--stage", "supervised"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--data", str(data), "--pred", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(label) in err and "are outside 0..3" in err
    assert "no remap option" in err and "label_remap" not in err and "pass a remap" not in err


def test_round_plots_have_whole_rounds_counts_from_zero_and_every_series_visible():
    from fedqc.evaluation.figures import lines_figure

    fig = lines_figure({"site-a": [0, 0, 0], "site-b": [0, 0, 0], "site-c": [2, 1, 0]}, "refine round",
                       "flagged cases", "flagged", counts=True)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_ylim()[0] == 0.0
    assert all(float(t).is_integer() for t in ax.get_xticks()) and all(float(t).is_integer() for t in ax.get_yticks())
    lines = ax.get_lines()
    assert len({line.get_marker() for line in lines}) == 3
    # Equal series are drawn side by side, not on top of each other.
    xa, xb = lines[0].get_xdata(), lines[1].get_xdata()
    assert not np.allclose(xa, xb) and np.all(np.abs(np.asarray(xa) - np.round(xa)) < 0.25)
    import matplotlib.pyplot as plt

    plt.close(fig)
