"""Simulated toy federations shared by the simulation and privacy tests (each costs one Ray start)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedqc.fl.rounds import FederationError
from fedqc.fl.settings import FederationSettings
from fedqc.fl.simulation import SimulationConfig, run_simulation
from tests.fl.toy import toy_nodes

# The toy site algorithm (tests/fl/toy.py, fault injection included) is test code, not shipped in
# the package: the Flower child processes of these tests (Ray workers, flwr-clientapp) find it on
# this PYTHONPATH, set only for the federation tests.
_REPO = str(Path(__file__).resolve().parents[2])
os.environ["PYTHONPATH"] = os.pathsep.join([_REPO, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                      if p and p != _REPO]])


def toy_settings(**changes) -> FederationSettings:
    base = {"supervised_rounds": 2, "ae_rounds": 1, "refine_rounds": 2, "local_epochs": 2, "m_best": 2,
            "min_sites": 2, "node_wait_s": 60, "round_timeout_s": 120,
            "fence_source": "unlabelled",  # toy sites flag by their own rule: no consortium fences exchange
            "refine_aggregation": "eq2",  # one exchange per refine round (the resume run tests sequential)
            "site_run_config": {"lr": 0.1}}
    return FederationSettings(**{**base, **changes})


@pytest.fixture(scope="session")
def fedprox_run(tmp_path_factory):
    """FedProx, 3 sites (C unlabelled), every case of site A flagged so refinement runs K_semi rounds."""
    sites = [{"site-id": "A", "seed": 1, "flag-below": 1.01}, {"site-id": "B", "seed": 2, "shift": 0.5},
             {"site-id": "C", "seed": 3, "shift": 1.5, "labelled": False}]
    settings = toy_settings(strategy="fedprox", proximal_mu=0.1, min_sites=3)
    return run_simulation(SimulationConfig(sites=toy_nodes(sites), federation=settings), tmp_path_factory.mktemp("fedprox"))


@pytest.fixture(scope="session")
def audited_run(tmp_path_factory):
    """FedBN, bfloat16 on the wire, autoencoder on request, audit on; site L's algorithm tries to leak
    its images; nothing is flagged so refinement stops after one round."""
    sites = [{"site-id": "A", "seed": 1, "flag-below": -1.0}, {"site-id": "B", "seed": 2, "flag-below": -1.0},
             {"site-id": "C", "seed": 3, "labelled": False, "flag-below": -1.0},
             {"site-id": "L", "seed": 4, "leak": True, "flag-below": -1.0}]
    settings = toy_settings(strategy="fedbn", transfer_dtype="bfloat16", ae_delivery="on-request",
                            audit_replies=True, refine_rounds=3, min_sites=3)
    return run_simulation(SimulationConfig(sites=toy_nodes(sites), federation=settings), tmp_path_factory.mktemp("fedbn"))


@pytest.fixture(scope="session")
def failed_then_resumed_run(tmp_path_factory):
    """Site B fails in PREDICT (min_sites 2 of 2): the run stops; resumed with B fixed, it completes.
    Refinement is sequential (the semi-supervised half, then the supervised half, each round)."""
    run_dir = tmp_path_factory.mktemp("resume")
    sites = [{"site-id": "A", "seed": 1, "flag-below": 1.01}, {"site-id": "B", "seed": 2, "fail-task": "predict"}]
    settings = toy_settings(supervised_rounds=1, refine_rounds=1, m_best=1, audit_replies=True,
                            refine_aggregation="sequential")
    with pytest.raises(FederationError) as failure:
        run_simulation(SimulationConfig(sites=toy_nodes(sites), federation=settings), run_dir)
    fixed = [sites[0], {"site-id": "B", "seed": 2}]
    run_simulation(SimulationConfig(sites=toy_nodes(fixed), federation=settings), run_dir, resume=True)
    return run_dir, str(failure.value)
