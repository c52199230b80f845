"""The real method federated with privacy on: DP-SGD at the labelled site and secure aggregation, on the
simulation engine over tiny simulated hospitals (one or two rounds per phase)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fedqc.cli.main import main
from fedqc.fl import run_state
from fedqc.site.contract import candidate_prefix
from tests.conftest import tiny_config_dict
from tests.test_federation import parameter_shapes
from tests.fl.test_privacy import audit_problems

pytestmark = pytest.mark.slow


def test_simulated_federation_with_dp_and_secure_aggregation(tiny_data, tmp_path):
    data = tiny_config_dict(tiny_data, views=["SA"],
                            federation={"supervised_rounds": 2, "ae_rounds": 1, "local_epochs": 1, "min_sites": 2,
                                        "timeout_s": 300, "refine_aggregation": "slices"},
                            qc={"tukey_factor": 0.0},  # fences at the quartiles: refinement has flagged cases
                            refine={"k_semi": 1}, privacy={"dp": {"epsilon": 8.0}, "secure_aggregation": True})
    config = tmp_path / "federation.yaml"
    config.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    assert main(["simulate", "--config", str(config), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["dp_epsilon"]) == {"centre1"}  # the labelled site; centre2 trains no DP model
    assert 7.9 < summary["dp_epsilon"]["centre1"]["epsilon"] <= 8.0  # the planned steps spend the budget
    assert not summary["dp_epsilon"]["centre1"]["budget_spent"]
    ledger = json.loads((run / "sites" / "centre1" / "privacy" / "ledger.json").read_text())
    assert ledger["unit"] == "patient" and ledger["spent"] == pytest.approx(summary["dp_epsilon"]["centre1"]["epsilon"],
                                                                            abs=1e-5)
    report = (run / "report.md").read_text()
    assert "## Privacy" in report and "centre1" in report.split("## Privacy")[1]
    log = json.loads((run / "log.json").read_text())
    weight_rounds = [r for r in log if r["phase"] in ("supervised", "qc-autoencoder", "refine")]
    assert [r["phase"] for r in weight_rounds] == ["supervised", "supervised", "qc-autoencoder", "refine"]
    assert all(r["secure_aggregation"] == "masked sum of 2 sites" for r in weight_rounds)
    # Refinement under DP (unlabelled-only): the labelled site sends nothing, the unlabelled site refines.
    refine = weight_rounds[-1]
    assert refine["aggregated_from"] == ["centre2"] and refine["sites"]["centre1"]["metrics"]["num-examples"] == 0
    # Under DP (refinement: unlabelled-only) the labelled site sends no refinement update: the control
    # M+sup, made of its supervised share alone, gets no contribution and keeps the supervised candidates.
    assert all(r["secure_aggregation"] == "no contribution" for r in log if r["phase"] == "control")
    # The candidates the AE phase carried as inputs came back unchanged (only ae/ is in its masked sum),
    # and refinement moved them by a small step: close to the supervised round they came from.
    state = run_state.read_json(run / run_state.STATE)
    final = run_state.load_arrays(run / state["weights"])
    start = run_state.load_arrays(run_state.supervised_checkpoint(run, state["candidates"][0]))
    conv = [k for k, v in start.items() if v.ndim == 4]
    before = np.concatenate([start[k].ravel() for k in conv])
    after = np.concatenate([final[candidate_prefix(0) + k].ravel() for k in conv])
    assert np.corrcoef(before, after)[0, 1] > 0.9
    shapes = parameter_shapes(data, m_best=2)
    for audit in sorted((run / "audit").glob("*.jsonl")):
        entries = [json.loads(line) for line in audit.read_text().splitlines()]
        assert [p for e in entries for p in audit_problems(e, audit.stem, shapes)] == []
        for e in entries:
            if e["task"] in ("supervised", "qc-autoencoder", "refine") and "records" in e:
                assert {a["dtype"] for a in e["records"]["weights"]["items"].values()} == {"int64"}
