"""State that must belong to one run: a site's fences and cached autoencoder, a run folder's refined
models and fences, a prediction folder's files (issue 15, points 2, 3 and 9). Real site algorithm,
real commands, real files."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from fedqc.cli.main import main
from fedqc.config import config_from_dict, to_dict
from fedqc.config.flat import encode_value, flatten
from fedqc.site.algorithm import make_site_algo
from fedqc.site.contract import Task, candidate_prefix
from tests.conftest import tiny_config_dict
from tests.subsets import read_csv as _read_csv
from tests.subsets import subset


def _site(root, work, labelled: bool, **sections):
    config = config_from_dict(tiny_config_dict(root, views=["SA"], **sections))
    settings = to_dict(config)
    settings.pop("sites")
    settings.pop("simulated", None)
    centre = 1 if labelled else 2
    node = {"site-id": f"c{centre}", "work-dir": str(work), "root": str(root),
            "filter": encode_value({"CENTRE": centre}), "labelled": labelled, "test-fraction": 0.25,
            "views": "SA"}
    return make_site_algo(node, flatten(settings))


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):
    """The REFINE weights of two federations: the same supervised candidates, other autoencoders
    (run B's autoencoder had one more epoch: what a new federation with other settings sends)."""
    site = _site(tiny_data, tmp_path_factory.mktemp("w"), labelled=True)
    seg = site.run(Task.SUPERVISED, None, {"local-epochs": 0, "seed": 0}).weights
    seg = site.run(Task.SUPERVISED, seg, {"local-epochs": 1, "phase-round": 1}).weights
    ae = site.run(Task.QC_AUTOENCODER, None, {"local-epochs": 0, "seed": 0}).weights
    ae_a = site.run(Task.QC_AUTOENCODER, ae, {"local-epochs": 1, "phase-round": 1}).weights
    ae_b = site.run(Task.QC_AUTOENCODER, ae_a, {"local-epochs": 1, "phase-round": 2}).weights
    candidates = {candidate_prefix(i) + k: v for i in range(2) for k, v in seg.items()}
    return {**candidates, **ae_a}, {**candidates, **ae_b}


REFINE = {"local-epochs": 1, "alpha": 1.0, "num-candidates": 2, "phase-round": 1}


def _fences(work):
    record = json.loads((work / "thresholds" / "SA.json").read_text())
    return {k: record[k] for k in ("th_low_pdc", "th_up_phd", "q1_pdc", "q3_pdc", "q1_phd", "q3_phd")}


def test_fences_of_an_earlier_federation_are_refitted_not_reused(tiny_data, tmp_path, two_runs, caplog):
    run_a, run_b = two_runs
    work = tmp_path / "work"
    _site(tiny_data, work, labelled=False).run(Task.REFINE, run_a, REFINE)
    fences_a = _fences(work)
    # What run B's fences are when fitted with nothing left over from run A.
    _site(tiny_data, tmp_path / "fresh", labelled=False).run(Task.REFINE, run_b, REFINE)
    fences_b = _fences(tmp_path / "fresh")
    assert fences_a != fences_b
    # A new federation at the same site (same work dir): its own fences, and the log says why.
    with caplog.at_level(logging.WARNING, logger="fedqc.site"):
        _site(tiny_data, work, labelled=False).run(Task.REFINE, run_b, REFINE)
    assert _fences(work) == fences_b
    assert any("another run" in r.getMessage() and "SA.json" in r.getMessage() for r in caplog.records)
    assert json.loads((work / "thresholds" / "SA.json").read_text())["run"]["ae"]


def test_fences_of_this_run_are_kept_across_rounds_and_restarts(tiny_data, tmp_path, two_runs, caplog):
    run_a, _ = two_runs
    work = tmp_path / "work"
    site = _site(tiny_data, work, labelled=False)
    first = site.run(Task.REFINE, run_a, REFINE)
    fences = _fences(work)
    moved = {k: (v + np.float32(0.01) * np.sign(v) if k.startswith("m") and v.dtype.kind == "f" else v) for k, v in run_a.items()}
    site.run(Task.REFINE, moved, {**REFINE, "phase-round": 2})  # later round: other candidates, same fences
    assert _fences(work) == fences
    with caplog.at_level(logging.WARNING, logger="fedqc.site"):  # a restarted SuperNode, same run
        again = _site(tiny_data, work, labelled=False).run(Task.REFINE, run_a, REFINE)
    assert _fences(work) == fences and again.metrics["num-flagged"] == first.metrics["num-flagged"]
    assert not any("another run" in r.getMessage() for r in caplog.records)


def test_a_cached_autoencoder_of_another_run_is_refused(tiny_data, tmp_path, two_runs):
    run_a, _ = two_runs
    work = tmp_path / "work"
    _site(tiny_data, work, labelled=False).run(Task.REFINE, run_a, REFINE)
    candidates = {k: v for k, v in run_a.items() if k.startswith("m")}
    # The same run, restarted: the cached autoencoder is this run's.
    reply = _site(tiny_data, work, labelled=False).run(Task.PREDICT, candidates, {"num-candidates": 2})
    assert reply.metrics["num-cases"] == 16
    # Another federation (other settings) that does not send its autoencoder: refused, not reused.
    other = _site(tiny_data, work, labelled=False, qc={"tukey_factor": 3.0})
    with pytest.raises(Exception, match="another run") as error:
        other.run(Task.PREDICT, candidates, {"num-candidates": 2})
    assert "qc_autoencoder" in str(error.value)


def test_training_into_a_run_folder_removes_what_it_makes_stale_and_predict_refuses_old_refined(
        trained, tiny_data, tmp_path, capsys):
    config, trained_run = trained
    run = shutil.copytree(trained_run, tmp_path / "run")
    assert main(["refine", "--config", str(config), "--run", str(run)]) == 0
    assert (run / "SA" / "refined" / "candidate_0.pt").is_file() and (run / "SA" / "thresholds").is_dir()
    old_refined = {v: shutil.copytree(run / v / "refined", tmp_path / f"refined_{v}") for v in ("SA", "LA")}
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(run), "--set", "train.seed=5",
                 "--set", "train.epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert "stale" in printed and "refined" in printed
    for view in ("SA", "LA"):
        assert not (run / view / "refined").exists()
        assert not (run / view / "thresholds" / "centre2.json").exists()
        assert not (run / view / "refine_log.json").exists()
    # Someone restores the earlier refined models: predict refuses them, by name, and writes nothing.
    for view, folder in old_refined.items():
        shutil.copytree(folder, run / view / "refined")
    out = tmp_path / "pred"
    data = _subjects(tiny_data, tmp_path, 3)
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another training" in err and str(run / "SA" / "refined") in err and "Traceback" not in err
    assert not list(out.glob("*_pred.nii.gz"))
    # The supervised models of the current training still predict.
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(out), "--stage", "supervised"]) == 0


def _subjects(tiny_data, tmp_path, n: int):
    return subset(tiny_data, tmp_path / f"data{n}", n)


def test_predict_into_a_folder_of_older_predictions_leaves_only_this_runs(trained, tiny_data, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--data", str(_subjects(tiny_data, tmp_path, 3)),
                 "--out", str(out)]) == 0
    assert len(list(out.glob("*_pred.nii.gz"))) == 24
    (out / "notes.txt").write_text("the clinician's own file")
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--data", str(_subjects(tiny_data, tmp_path, 2)),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _read_csv(out / "qc.csv")
    assert len(rows) == 16
    listed = {r["case_id"] for r in rows}
    assert {p.name.removesuffix("_pred.nii.gz") for p in out.glob("*_pred.nii.gz")} == listed
    assert {p.stem for p in (out / "overlays").glob("*.png")} == {r["case_id"] for r in rows if r["ood"] == "True"}
    assert {p.stem for p in (out / "review").glob("*.png")} == listed
    assert "removed 8 stale predictions" in printed
    assert (out / "notes.txt").read_text() == "the clinician's own file"  # not fedqc's: untouched
