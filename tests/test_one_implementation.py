"""One implementation per stage: a one-site federation and the centralised commands, same seed and
data, give identical supervised and refined weights (the same functions run on both paths)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml

from fedqc.cli.main import main
from fedqc.fl import run_state
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow


def _config(tiny_data) -> dict:
    # One labelled hospital that also keeps unlabelled subjects (its adaptation pool); one round per
    # phase, as many local epochs as the centralised epochs (1: with m_best 1 the centralised run keeps its
    # best-validation epoch, the federation its last), fences at the quartiles so that refinement has work.
    # eq2: one site's round is then centralised Eq. 2 exactly (sequential splits its two terms in two steps).
    data = tiny_config_dict(tiny_data, views=["SA"],
                            train={"epochs": 1, "m_best": 1, "val_fraction": 0.4, "seed": 3},
                            qc={"ae_epochs": 1, "threshold_source": "labelled-val", "tukey_factor": 0.0,
                                "autoencoder": "corrective", "segmenter_examples": True},
                            refine={"k_semi": 1},
                            federation={"supervised_rounds": 1, "ae_rounds": 1, "local_epochs": 1, "min_sites": 1,
                                        "timeout_s": 300, "refine_aggregation": "eq2"})
    data["sites"] = [{"name": "centre1", "root": str(tiny_data), "filter": {"CENTRE": 1}, "labelled": True,
                      "unlabelled_fraction": 0.4}]
    return data


def _same(fed: dict[str, np.ndarray], prefix: str, state: dict[str, torch.Tensor]) -> list[str]:
    """Names whose arrays differ (or are missing) between the federated weights and a state dict."""
    mine = {k[len(prefix):]: v for k, v in fed.items() if k.startswith(prefix)}
    assert set(mine) == set(state)
    return [k for k, v in state.items() if not np.array_equal(mine[k], v.numpy())]


def test_one_site_federation_equals_the_centralised_commands(tiny_data, tmp_path):
    data = _config(tiny_data)
    config = tmp_path / "one-site.yaml"
    config.write_text(yaml.safe_dump(data))
    central, federated = tmp_path / "central", tmp_path / "federated"
    # Float sums depend on the thread count: run the centralised commands with the torch threads the
    # simulation gives its one site (all cores), so that identical arithmetic means identical bits.
    torch.set_num_threads(os.cpu_count() or 1)
    assert main(["train", "--config", str(config), "--out", str(central)]) == 0
    assert main(["simulate", "--config", str(config), "--out", str(federated)]) == 0

    supervised = run_state.load_arrays(run_state.supervised_checkpoint(federated, 1))
    central_sup = torch.load(central / "SA" / "supervised" / "candidate_0.pt", weights_only=True)
    assert _same(supervised, "seg/SA/", central_sup) == []

    state = run_state.read_json(federated / run_state.STATE)
    final = run_state.load_arrays(federated / state["weights"])
    central_ae = torch.load(central / "SA" / "qc_autoencoder.pt", weights_only=True)
    assert _same(final, "ae/SA/", central_ae) == []

    log = [r for r in run_state.read_json(federated / run_state.LOG) if r["phase"] == "refine"]
    assert log and log[0]["num_flagged"]["centre1"] > 0  # refinement had flagged cases to work on
    # The centralised refinement of the same pool: one epoch of Eq. 2 = one federated round of 1 local epoch.
    assert main(["refine", "--config", str(config), "--run", str(central)]) == 0
    central_ref = torch.load(central / "SA" / "refined" / "candidate_0.pt", weights_only=True)
    assert _same(final, "m0/seg/SA/", central_ref) == []
    assert _same(supervised, "seg/SA/", central_ref) != []  # refinement did change the model
