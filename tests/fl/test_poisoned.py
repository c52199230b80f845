"""A hostile and a broken site in a simulated federation: both refused by name, the model stays sound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedqc.fl import run_state
from fedqc.fl.simulation import SimulationConfig, run_simulation
from tests.fl.conftest import toy_settings
from tests.fl.toy import toy_nodes

pytestmark = pytest.mark.slow


def test_poisoned_and_broken_updates_are_rejected_and_never_reach_the_global_model(tmp_path):
    sites = [{"site-id": s, "seed": i + 1, "shift": 0.2 * i} for i, s in enumerate("ABC")]
    sites += [{"site-id": "P", "seed": 7, "poison": "scale"}, {"site-id": "N", "seed": 8, "poison": "nan"}]
    settings = toy_settings(min_sites=5, supervised_rounds=2, refine_rounds=1, norm_factor=10.0)
    run_dir = run_simulation(SimulationConfig(sites=toy_nodes(sites), federation=settings), tmp_path / "run")
    rows = [r for r in json.loads((run_dir / "log.json").read_text()) if r["phase"] == "supervised"]
    assert len(rows) == 2
    for row in rows:
        assert sorted(row["aggregated_from"]) == ["A", "B", "C"]
        assert "norm" in row["rejected"]["P"] and "NaN" in row["rejected"]["N"]
        honest = [row["update_norms"][s] for s in "ABC"]
        assert row["update_norms"]["P"] > 100 * max(honest)
    weights = run_state.load_arrays(run_dir / json.loads((run_dir / "state.json").read_text())["weights"])
    assert all(np.all(np.isfinite(v)) for v in weights.values() if v.dtype.kind == "f")
    scores = json.loads((run_dir / "state.json").read_text())["best"]["scores"]
    assert scores["2"] > scores["1"] > 0  # the honest sites' model keeps learning
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
