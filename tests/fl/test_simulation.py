"""The whole protocol on Flower's simulation engine with the toy site algorithm (real Ray, loopback)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedqc.fl import run_state
from fedqc.fl.rounds import FederationError
from fedqc.fl.simulation import SimulationConfig, run_simulation
from tests.fl.toy import toy_nodes

from .conftest import toy_settings

pytestmark = pytest.mark.slow


def _log(run_dir):
    return json.loads((run_dir / run_state.LOG).read_text())


def test_every_phase_runs_and_the_run_directory_is_complete(fedprox_run):
    summary = json.loads((fedprox_run / run_state.SUMMARY).read_text())
    phases = [(row["phase"], row["round"]) for row in _log(fedprox_run)]
    assert phases == [("init", 0), ("supervised", 1), ("supervised", 2), ("supervised-evaluate", 2),
                      ("qc-autoencoder", 1), ("refine", 1), ("refine", 2), ("predict", 1)]
    assert summary["status"] == "completed" and summary["exchanges"] == 8
    assert len(summary["m_best"]) == 2 and all(v is not None for v in summary["val_scores"].values())
    assert json.loads((fedprox_run / run_state.STATE).read_text())["phase"] == "done"
    for site in "ABC":
        assert (fedprox_run / "sites" / site / "predictions.npz").is_file()
    kept = sorted(p.name for p in (fedprox_run / run_state.CHECKPOINTS).glob("supervised-*.npz"))
    assert kept == [f"supervised-{r:03d}.npz" for r in sorted(summary["m_best"])]
    coordinator_files = [p for p in fedprox_run.rglob("*") if p.is_file() and "sites" not in p.parts]
    assert coordinator_files and all(p.stat().st_mode & 0o077 == 0 for p in coordinator_files)
    print(f"\nsimulation (3 sites, 8 exchanges): {summary['seconds']} s; per phase {summary['phases']}")


def test_unlabelled_site_trains_nothing_and_labelled_sites_are_averaged(fedprox_run):
    rows = {(r["phase"], r["round"]): r for r in _log(fedprox_run)}
    assert sorted(rows[("supervised", 1)]["aggregated_from"]) == ["A", "B"]
    assert rows[("supervised", 1)]["sites"]["C"]["metrics"]["num-examples"] == 0
    assert rows[("supervised", 2)]["val_score_of_round"] == 1


def test_refinement_changed_the_global_model_with_alpha_per_round(fedprox_run):
    rows = [r for r in _log(fedprox_run) if r["phase"] == "refine"]
    assert [r["alpha"] for r in rows] == [1.0, 0.5]
    assert all(r["num_flagged"]["A"] == 24 and r["aggregated_from"] for r in rows)
    best = json.loads((fedprox_run / run_state.SUMMARY).read_text())["m_best"]
    final = run_state.load_arrays(run_state.current_global(fedprox_run))
    for i, round_ in enumerate(best):
        before = run_state.load_arrays(run_state.supervised_checkpoint(fedprox_run, round_))
        assert not np.allclose(final[f"m{i}/seg/SA/conv.weight"], before["seg/SA/conv.weight"])


def test_fedbn_keeps_normalisation_layers_out_of_the_global_model(audited_run):
    final = run_state.load_arrays(run_state.current_global(audited_run))
    np.testing.assert_array_equal(final["m0/seg/SA/bn.weight"], np.ones(4, np.float32))
    np.testing.assert_array_equal(final["m0/seg/SA/bn.running_mean"], np.zeros(4, np.float32))
    # The shared layers were trained and averaged: supervised round 2 moved the conv weights away from
    # its input (round 1's global model), the BatchNorm ones stayed out, and the candidates are those
    # trained rounds (nothing was flagged, so refinement left them as they were).
    first, second = (run_state.load_arrays(run_state.supervised_checkpoint(audited_run, r)) for r in (1, 2))
    assert not np.allclose(second["seg/SA/conv.weight"], first["seg/SA/conv.weight"])
    np.testing.assert_array_equal(second["seg/SA/bn.weight"], first["seg/SA/bn.weight"])
    best = json.loads((audited_run / run_state.SUMMARY).read_text())["m_best"]
    assert sorted(best) == [1, 2]
    for i, round_ in enumerate(best):
        trained = run_state.load_arrays(run_state.supervised_checkpoint(audited_run, round_))
        np.testing.assert_array_equal(final[f"m{i}/seg/SA/conv.weight"], trained["seg/SA/conv.weight"])


def test_autoencoder_sent_once_per_site_on_request_and_refinement_stops_without_flags(audited_run):
    rows = _log(audited_run)
    refine = [r for r in rows if r["phase"] == "refine"]
    assert len(refine) == 1 and not any(refine[0]["num_flagged"].values())
    assert sorted(refine[0]["ae_sent_to"]) == ["A", "B", "C", "L"]
    assert [r["ae_sent_to"] for r in rows if r["phase"] == "predict"] == [[]]


def test_a_site_that_fails_is_named_and_the_others_go_on(audited_run):
    rows = [r for r in _log(audited_run) if r["phase"] == "supervised"]
    assert all("L" in r["failed"] and "ValueError" in r["failed"]["L"] for r in rows)
    assert all("L" not in r["aggregated_from"] for r in rows)


def test_resume_after_a_failed_round_continues_where_it_stopped(failed_then_resumed_run):
    run_dir, failure = failed_then_resumed_run
    assert "predict: only 1 of the required 2 sites answered" in failure and "'B'" in failure
    rows = _log(run_dir)
    phases = [r["phase"] for r in rows]
    assert phases.count("init") == 1 and phases.count("supervised") == 1 and phases.count("refine") == 1
    assert phases[-2:] == ["predict", "predict"] and "error" in rows[-2]
    assert json.loads((run_dir / run_state.SUMMARY).read_text())["status"] == "completed"
    assert rows[-1]["server_round"] == rows[-3]["server_round"] + 2  # the failed exchange counts


def test_a_sequential_round_steps_on_the_flagged_cases_then_on_the_labels(failed_then_resumed_run):
    run_dir, _ = failed_then_resumed_run
    (row,) = [r for r in _log(run_dir) if r["phase"] == "refine"]
    # First half: only A flagged; its step has no labelled term and is the only one aggregated.
    assert row["num_flagged"]["A"] == 24 and row["aggregated_from"] == ["A"]
    assert row["sites"]["A"]["metrics"]["num-labelled"] == 0
    assert row["sites"]["A"]["metrics"]["num-examples"] == 24
    # Second half, from there: both labelled sites' supervised term, nothing flagged.
    half = row["supervised_half"]
    assert sorted(half["aggregated_from"]) == ["A", "B"]
    assert all(half["sites"][s]["metrics"]["num-flagged"] == 0 and half["sites"][s]["metrics"]["num-labelled"] > 0
               for s in "AB")
    assert row["server_round"] == [r for r in _log(run_dir) if r["phase"] == "supervised-evaluate"][0]["server_round"] + 3


@pytest.mark.parametrize("counts", [{"min_sites": 3}, {"min_sites": 1, "start_sites": 3}],
                         ids=["min_sites", "start_sites"])
def test_too_few_sites_fail_fast_with_a_clear_message(tmp_path, counts):
    sites = [{"site-id": "A", "seed": 1}, {"site-id": "B", "seed": 2}]
    settings = toy_settings(**counts, node_wait_s=3)  # start_sites: the first round waits for 3 even if 1 will do
    with pytest.raises(FederationError, match=r"only 2 of the 3 required sites connected within 3 s"):
        run_simulation(SimulationConfig(sites=toy_nodes(sites), federation=settings), tmp_path)


@pytest.mark.slow
def test_a_server_learning_rate_scales_the_refine_step_and_nothing_else(tmp_path):
    """Real Flower simulation, toy sites: with federation.refine_server_lr 2 the refine round's global
    step is twice the sites' mean step (the same sites, seeds and supervised candidates)."""
    from fedqc.fl import run_state

    sites = [{"site-id": "A", "seed": 1, "flag-below": 1.01}, {"site-id": "B", "seed": 2, "shift": 0.5},
             {"site-id": "C", "seed": 3, "shift": 1.5, "labelled": False, "flag-below": 1.01}]
    common = dict(min_sites=3, refine_rounds=1, m_best=1, supervised_rounds=1, predict=False,
                  refine_aggregation="slices")
    runs = {lr: run_simulation(SimulationConfig(sites=toy_nodes(sites), federation=toy_settings(
        **common, refine_server_lr=lr)), tmp_path / f"lr{lr}") for lr in (1.0, 2.0)}

    def final(run_dir):
        state = run_state.read_json(run_dir / run_state.STATE)
        return run_state.load_arrays(run_dir / state["weights"]), state

    (one, state), (two, _) = final(runs[1.0]), final(runs[2.0])
    start = run_state.load_arrays(run_state.supervised_checkpoint(runs[1.0], state["candidates"][0]))
    moved = 0
    for name, value in start.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        step = one["m0/" + name].astype(np.float64) - value
        if "running_" in name:  # normalisation statistics: averaged, never extrapolated
            np.testing.assert_allclose(two["m0/" + name], one["m0/" + name], atol=1e-5, err_msg=name)
            continue
        np.testing.assert_allclose(two["m0/" + name], value + 2 * step, atol=1e-5, err_msg=name)
        moved += bool(np.abs(step).max() > 1e-4)
    assert moved  # refinement moved the candidates
    log = run_state.read_json(runs[2.0] / run_state.LOG)
    assert [r.get("server_lr") for r in log if r["phase"] == "refine"] == [2.0]
