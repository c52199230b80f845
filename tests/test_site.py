"""The real site algorithm through every task of the protocol, without Flower (FedAvg by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.config import config_from_dict
from fedqc.config.flat import flatten, unflatten
from fedqc.site.contract import ALLOWED_METRIC_KEYS, Task, candidate_prefix
from tests.conftest import site_algos, tiny_config_dict


def fedavg(replies):
    replies = [r for r in replies if r.weights]
    total = sum(r.metrics["num-examples"] for r in replies)
    return {k: sum(r.weights[k] * r.metrics["num-examples"] for r in replies) / total for k in replies[0].weights}


@pytest.fixture(scope="module")
def sites(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("sites")
    config = config_from_dict(tiny_config_dict(tiny_data, views=["SA"]))
    return site_algos(config, work), work


def test_flatten_round_trip():
    data = {"train": {"epochs": 3, "lr": 0.1}, "views": ["SA"], "model": {"kwargs": {"channels": [4, 8]}}}
    assert unflatten(flatten(data)) == data
    assert all('"' not in str(v) for v in flatten({"sites": {"filter": {"VENDOR": "GE's"}}, **data}).values())


def test_every_task_end_to_end(sites):
    algos, work = sites
    weights = algos[0].run(Task.SUPERVISED, None, {"local-epochs": 0, "seed": 0}).weights
    assert weights and all(k.startswith("seg/SA/") for k in weights)
    replies = [a.run(Task.SUPERVISED, weights, {"local-epochs": 1, "phase-round": 1}) for a in algos]
    assert replies[0].metrics["num-examples"] > 0 and "val-dice" in replies[0].metrics
    assert replies[1].weights is None and replies[1].metrics["num-examples"] == 0  # unlabelled site
    new = fedavg(replies)
    assert any(not np.array_equal(new[k], weights[k]) for k in weights)
    ae = algos[0].run(Task.QC_AUTOENCODER, None, {"local-epochs": 0, "seed": 0}).weights
    ae = fedavg([a.run(Task.QC_AUTOENCODER, ae, {"local-epochs": 1, "phase-round": 1}) for a in algos])
    candidates = {candidate_prefix(i) + k: v for i in range(2) for k, v in new.items()}
    refine = [a.run(Task.REFINE, {**candidates, **ae}, {"local-epochs": 1, "alpha": 1.0, "num-candidates": 2})
              for a in algos]
    assert refine[1].metrics["num-cases"] > 0
    assert refine[0].weights is not None  # the labelled site contributes the supervised term
    # The counts that let the coordinator weight the two terms of Eq. 2 (fedqc.fl.aggregation.eq2_average).
    assert refine[0].metrics["num-labelled"] == refine[0].metrics["num-examples"] > 0
    assert refine[1].metrics["num-labelled"] == 0  # unlabelled: whatever it used was flagged slices
    assert (work / "centre2" / "thresholds" / "SA.json").is_file()  # fences stay at the site
    # The autoencoder was cached at each site: PREDICT needs no autoencoder weights in the message.
    predict = [a.run(Task.PREDICT, candidates, {"num-candidates": 2}) for a in algos]
    assert predict[1].metrics["num-cases"] == 16
    assert len(list((work / "centre2" / "predictions").glob("*_pred.nii.gz"))) == 16
    sent = [(replies, weights), (refine, candidates), (predict, {})]
    for answers, received in sent:
        for reply in answers:
            assert set(reply.metrics) <= ALLOWED_METRIC_KEYS
            assert all(isinstance(v, (int, float, bool)) for v in reply.metrics.values())
            # Exactly the arrays the task was sent (the frozen autoencoder never comes back), same shapes.
            assert set(reply.weights or {}) <= set(received) and not any(n.startswith("ae/") for n in reply.weights or {})
            for name, array in (reply.weights or {}).items():
                assert isinstance(array, np.ndarray) and array.dtype.kind == "f" and array.shape == received[name].shape
    assert set(refine[0].weights) == set(candidates)  # every candidate refined and returned


def test_a_config_reaches_the_site_unchanged(tiny_data):
    from fedqc.fl.from_config import node_config, site_run_config
    from fedqc.site.algorithm import site_config

    config = config_from_dict(tiny_config_dict(tiny_data, train={"epochs": 7}, qc={"classes": "foreground"}))
    for site in config.sites:
        built = site_config(node_config(site, config.views), site_run_config(config))
        assert built.sites[0] == site
        assert built.train == config.train and built.qc == config.qc and built.views == config.views


def test_refine_sends_only_the_views_it_trained_with_counts_per_view(tiny_data, tmp_path):
    """A site that flags cases in one view and none in the other trains one view: only that view's
    candidates travel, and its counts per view say so (the coordinator then averages each view over
    the sites that trained it, by that view's slices: fedqc.fl.aggregation.split_by_view)."""
    import json

    config = config_from_dict(tiny_config_dict(tiny_data, views=["SA", "LA"], qc={"threshold_source": "consortium"}))
    labelled, unlabelled = site_algos(config, tmp_path, views="SA,LA")
    seg = labelled.run(Task.SUPERVISED, None, {"local-epochs": 0, "seed": 0}).weights
    ae = labelled.run(Task.QC_AUTOENCODER, None, {"local-epochs": 0, "seed": 0}).weights
    candidates = {candidate_prefix(0) + k: v for k, v in seg.items()}
    # Fences that flag every SA case (pDC <= 1 < 1.5) and no LA case.
    everything = {"th_low_pdc": 1.5, "th_up_phd": -1.0, "q1_pdc": 0, "q3_pdc": 1, "q1_phd": 0, "q3_phd": 1,
                  "factor": 1.5, "n_cases": 10, "source": "test"}
    nothing = {**everything, "th_low_pdc": -1.0, "th_up_phd": 1e9}
    config = {"local-epochs": 1, "alpha": 1.0, "num-candidates": 1, "phase-round": 1,
              "consortium-fences": json.dumps({"SA": everything, "LA": nothing})}
    reply = unlabelled.run(Task.REFINE, {**candidates, **ae}, config)
    m = reply.metrics
    assert m["num-flagged-SA"] > 0 and m["num-flagged-LA"] == 0
    assert m["num-examples-SA"] > 0 and m["num-examples-LA"] == 0 and m["num-labelled-SA"] == 0
    assert m["num-examples"] == m["num-examples-SA"] and m["num-flagged"] == m["num-flagged-SA"]
    assert reply.weights and all(name.startswith("m0/seg/SA/") for name in reply.weights)
    assert set(reply.weights) == {n for n in candidates if n.startswith("m0/seg/SA/")}
    assert set(m) <= ALLOWED_METRIC_KEYS
    # The labelled site trains both views on its labelled slices: both travel, each with its own count.
    both = labelled.run(Task.REFINE, {**candidates, **ae}, {**config, "control": True})
    assert set(both.weights) == set(candidates)
    assert both.metrics["num-labelled-SA"] == both.metrics["num-examples-SA"] > 0
    assert both.metrics["num-examples-LA"] > 0
    assert both.metrics["num-examples"] == both.metrics["num-examples-SA"] + both.metrics["num-examples-LA"]
