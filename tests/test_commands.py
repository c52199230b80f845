"""The centralised commands end to end on tiny data: train -> refine -> predict -> evaluate."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np

from fedqc.cli.main import main


def test_train_writes_ranked_candidates_and_autoencoder(trained):
    _, run = trained
    for view in ("SA", "LA"):
        info = json.loads((run / view / "supervised" / "candidates.json").read_text())
        assert len(info) == 2
        assert info[0]["val_score"] >= info[1]["val_score"]
        assert (run / view / "qc_autoencoder.pt").is_file()
    assert (run / "config.yaml").is_file()


def test_refine_changes_the_candidates(trained, tmp_path):
    import shutil

    import torch

    config, trained_run = trained
    run = shutil.copytree(trained_run, tmp_path / "run")
    assert main(["refine", "--config", str(config), "--run", str(run)]) == 0
    log = json.loads((run / "SA" / "refine_log.json").read_text())
    assert log["epochs"], "refinement ran no epoch although fences inside the IQR flag cases"
    before = torch.load(run / "SA" / "supervised" / "candidate_0.pt")
    after = torch.load(run / "SA" / "refined" / "candidate_0.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    fences = json.loads((run / "SA" / "thresholds" / "centre2.json").read_text())
    assert fences["source"] == "unlabelled" and fences["n_cases"] > 0


def test_refine_local_epochs_are_eq2_epochs_per_round(trained, tmp_path):
    import shutil

    import torch

    config, trained_run = trained
    runs = {}
    for epochs in (1, 2):
        run = shutil.copytree(trained_run, tmp_path / f"run{epochs}")
        assert main(["refine", "--config", str(config), "--run", str(run), "--set", f"refine.local_epochs={epochs}"]) == 0
        log = json.loads((run / "SA" / "refine_log.json").read_text())
        assert log["epochs"] and all(e["epochs"] == epochs for e in log["epochs"])
        runs[epochs] = torch.load(run / "SA" / "refined" / "candidate_0.pt")
    assert any(not torch.equal(runs[1][k], runs[2][k]) for k in runs[1])  # the second epoch moved the weights


def test_predict_and_evaluate(trained, tiny_data, tmp_path):
    _, run = trained
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--data", str(tiny_data), "--out", str(out)]) == 0
    preds = sorted(out.glob("*_pred.nii.gz"))
    assert len(preds) == 16 * 4
    image = nib.load(tiny_data / "001" / "001_SA_ED.nii.gz")
    pred = nib.load(out / "001_SA_ED_pred.nii.gz")
    assert pred.shape == image.shape
    assert np.allclose(pred.affine, image.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
    with open(out / "qc.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 64
    assert {"pdc", "phd_mm", "ood", "selected"} <= set(rows[0])
    assert {r["output"] for r in rows} == {"candidate"}  # qc.reconstruction_floor is off by default
    flagged = [r for r in rows if r["ood"] == "True"]
    assert len(list((out / "overlays").glob("*.png"))) == len(flagged)
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(tiny_data), "--pred", str(out), "--json", str(report)]) == 0
    summary = json.loads(report.read_text())["summary"]["RV"]
    assert summary["SA"]["all"]["n"] == 32
    assert 0.0 <= summary["SA"]["all"]["dice_mean"] <= 1.0


def test_bad_inputs_give_one_line_errors(tmp_path, capsys, write_config):
    assert main(["train", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    bad = write_config({"sites": [{"name": "a", "root": str(tmp_path / "empty"), "labelled": True}]})
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and "Traceback" not in err
    (tmp_path / "norun").mkdir()
    assert main(["predict", "--run", str(tmp_path / "norun"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "p")]) == 2
    assert "config.yaml missing" in capsys.readouterr().err


def test_help_is_instant_and_lists_commands(capsys):
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fedqc.cli.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("simulate-data", "train", "refine", "predict", "evaluate", "simulate"):
        assert command in result.stdout
    # No heavy imports behind --help: torch alone takes seconds to import here.
    check = subprocess.run([sys.executable, "-c", "import sys, fedqc.cli.main; print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "False"
    assert time.perf_counter() - start < 60


def test_server_and_client_refuse_to_run_without_tls_unless_told(tmp_path, capsys, write_config, tiny_data):
    from fedqc.cli.main import client_main, server_main
    from tests.conftest import tiny_config_dict

    method = write_config(tiny_config_dict(tiny_data))
    server = tmp_path / "server.yaml"
    server.write_text(f"method: {method}\nrun_dir: {tmp_path / 'run'}\nport: 9\n")
    assert server_main(["--config", str(server)]) == 2
    err = capsys.readouterr().err
    assert "tls" in err and "TLS is on by default" in err and "--insecure" in err
    site = tmp_path / "site.yaml"
    site.write_text(f"site: {{name: a, root: {tiny_data}, labelled: true}}\nsuperlink: 127.0.0.1:9\n")
    assert client_main(["--config", str(site)]) == 2
    err = capsys.readouterr().err
    assert "ca_cert" in err and "TLS is on by default" in err
    assert not (tmp_path / "run").exists()  # refused before anything was started or written
