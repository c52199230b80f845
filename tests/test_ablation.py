"""Known answers for the ablation's summaries and QC calibration."""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.evaluation.variants import CaseRecord, auroc, calibration, summarise_variants


def record(variant: str, dice: float, pdc: float, ood: bool, site: str = "a") -> CaseRecord:
    return CaseRecord(site, f"{site}{dice}", "SA", variant, dice, 10 * (1 - dice), dice, 5.0, pdc, 1 - pdc, ood)


def test_auroc_known_answers():
    positive = np.array([True, True, False, False])
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), positive) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), positive) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), positive) == 0.5  # ties count half


def test_calibration_precision_recall_and_spearman():
    records = [record("M", d, p, o) for d, p, o in
               [(0.95, 0.97, False), (0.9, 0.93, False), (0.7, 0.75, True), (0.5, 0.6, True), (0.85, 0.5, True)]]
    c = calibration(records)
    assert c["n_bad"] == 2 and c["n_flagged"] == 3
    assert c["precision"] == pytest.approx(2 / 3) and c["recall"] == 1.0
    assert c["spearman_pdc_dice"] == pytest.approx(0.7)  # rank differences 0,0,1,1,2: 1 - 6*6/120
    assert 0.5 < c["auroc_pdc"] <= 1.0


def test_summary_means_per_site_and_variant():
    records = [record("M", 0.8, 0.9, False), record("M", 0.6, 0.9, True), record("full", 0.9, 0.9, False)]
    rows = {r["variant"]: r for r in summarise_variants(records)}
    assert rows["M"]["rv_dice"] == pytest.approx(0.7) and rows["M"]["flagged"] == 1 and rows["M"]["n"] == 2
    assert rows["full"]["rv_hd_mm"] == pytest.approx(1.0)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_report_from_the_stored_results_reproduces_the_stored_tables(tmp_path):
    """`fedqc ablation --report-from docs/results` rebuilds docs/results/ablation_tables.md exactly."""
    from fedqc.cli.main import main

    out = tmp_path / "report"
    assert main(["ablation", "--config", str(REPO / "configs" / "ablation.yaml"), "--out", str(out),
                 "--report-from", str(REPO / "docs" / "results")]) == 0
    assert (out / "ablation.md").read_text() == (REPO / "docs" / "results" / "ablation_tables.md").read_text()


@pytest.mark.slow
def test_the_ablation_runs_every_variant_on_a_tiny_consortium(tiny_data, tmp_path):
    import json

    import yaml

    from fedqc.cli.main import main
    from tests.conftest import tiny_config_dict

    config = tmp_path / "ablation.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, views=["SA"], refine={"k_semi": 1},
                                                      qc={"tukey_factor": 0.0})))
    out = tmp_path / "out"
    assert main(["ablation", "--config", str(config), "--out", str(out), "--seeds", "0"]) == 0
    entry = json.loads((out / "seed0_SA.json").read_text())
    variants = {(r["site"], r["variant"]) for r in entry["summary"]}
    assert {("centre2", "M"), ("centre2", "{M}+QC"), ("centre2", "full")} <= variants
    assert entry["upper_bound"] and entry["transductive"]["summary"]
    assert set(entry["fence_eval"]["centre2"]) == {"consortium", "unlabelled"}
    assert {("centre2", "M+sup"), ("centre2", "{M+sup}+QC")} <= variants
    report = (out / "ablation.md").read_text()
    assert "| SA | centre2 | no |" in report
