"""Secure aggregation (privacy.secure_aggregation): the coordinator sees masked updates whose sum is the true sum."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedqc.fl import run_state, secagg
from fedqc.fl.simulation import SimulationConfig, run_simulation
from tests.fl.conftest import toy_settings
from tests.fl.toy import toy_nodes


def three_sites(tmp_path):
    keys = {node: secagg.site_key(tmp_path / f"site{node}", run_id=7) for node in (11, 22, 33)}
    peers = {node: secagg.public_hex(k) for node, k in keys.items()}
    rng = np.random.default_rng(0)
    updates = {node: {"seg/SA/w": rng.normal(size=(4, 5)).astype(np.float32),
                      "seg/SA/b": rng.normal(size=(5,)).astype(np.float32)} for node in keys}
    counts = {11: 120.0, 22: 80.0, 33: 0.0}  # site 33 contributes nothing but its masks (unlabelled, or budget spent)
    return keys, peers, updates, counts


def test_masked_updates_sum_to_the_weighted_sum_and_reveal_nothing_alone(tmp_path):
    keys, peers, updates, counts = three_sites(tmp_path)
    masked = {node: secagg.mask(updates[node], counts[node], node, keys[node], peers, "r1") for node in keys}
    sums = secagg.unmask_sum(list(masked.values()))
    for name in ("seg/SA/w", "seg/SA/b"):
        plain = sum(counts[n] * updates[n][name].astype(np.float64) for n in keys)
        np.testing.assert_allclose(sums[name], plain, atol=3 * 2.0**-secagg.SCALE_BITS * 200)
    for node, update in masked.items():
        assert all(v.dtype == np.int64 for v in update.values())
        decoded = update["seg/SA/w"].astype(np.float64) / 2.0**secagg.SCALE_BITS / max(counts[node], 1.0)
        # Read as if it were unmasked, one site's masked update is noise across the whole 64-bit range.
        assert np.median(np.abs(update["seg/SA/w"].astype(np.float64))) > 2.0**58
        assert abs(np.corrcoef(decoded.ravel(), updates[node]["seg/SA/w"].ravel())[0, 1]) < 0.9
        assert not np.allclose(decoded, updates[node]["seg/SA/w"], atol=1.0)
    # Without one participant's masked update the masks do not cancel: nothing near the partial sum.
    partial = secagg.unmask_sum([masked[11], masked[22]])
    expected = counts[11] * updates[11]["seg/SA/w"] + counts[22] * updates[22]["seg/SA/w"]
    assert np.min(np.abs(partial["seg/SA/w"] - expected)) > 1e3
    # Masks are fresh per round tag: the same update in another round masks differently.
    other = secagg.mask(updates[11], counts[11], 11, keys[11], peers, "r2")
    assert not np.array_equal(other["seg/SA/w"], masked[11]["seg/SA/w"])


def test_a_site_refuses_to_mask_for_a_bad_participant_set(tmp_path):
    keys, peers, updates, counts = three_sites(tmp_path)
    with pytest.raises(secagg.SecureAggregationError, match="at least 2"):
        secagg.mask(updates[11], 1.0, 11, keys[11], {11: peers[11]}, "r")
    forged = {**peers, 11: peers[22]}
    with pytest.raises(secagg.SecureAggregationError, match="not its own"):
        secagg.mask(updates[11], 1.0, 11, keys[11], forged, "r")
    with pytest.raises(secagg.SecureAggregationError, match="not among"):
        secagg.mask(updates[11], 1.0, 44, keys[11], peers, "r")
    assert secagg.site_key(tmp_path / "site11", run_id=7).private_bytes_raw() == keys[11].private_bytes_raw()
    assert oct((tmp_path / "site11" / "secagg" / "run-7.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_a_federation_with_secure_aggregation_gets_the_plain_federations_weights(tmp_path):
    """Real Flower simulation, toy sites (C unlabelled): every weight reply the coordinator receives is
    masked (int64 noise), and the aggregated global weights equal those of the same federation without
    secure aggregation, to the fixed-point precision."""
    sites = [{"site-id": "A", "seed": 1, "flag-below": 1.01}, {"site-id": "B", "seed": 2, "shift": 0.5},
             {"site-id": "C", "seed": 3, "shift": 1.5, "labelled": False}]
    common = dict(min_sites=3, refine_aggregation="slices", norm_factor=0, refine_rounds=1, m_best=1,
                  supervised_rounds=2, predict=False)
    plain = run_simulation(SimulationConfig(sites=toy_nodes(sites), federation=toy_settings(**common)),
                           tmp_path / "plain")
    masked = run_simulation(SimulationConfig(sites=toy_nodes(sites), federation=toy_settings(
        **common, secure_aggregation=True, audit_replies=True)), tmp_path / "masked")

    def final(run_dir):
        state = run_state.read_json(run_dir / run_state.STATE)
        return run_state.load_arrays(run_dir / state["weights"])

    a, b = final(plain), final(masked)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-5, err_msg=name)
    log = run_state.read_json(masked / run_state.LOG)
    rounds = [row for row in log if row["phase"] in ("supervised", "qc-autoencoder", "refine")]
    assert rounds and all(row["secure_aggregation"].startswith("masked sum of 3") for row in rounds)
    audit = {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
             for p in sorted((masked / "audit").glob("*.jsonl"))}
    weight_replies = [e for entries in audit.values() for e in entries
                      if e["task"] in ("supervised", "qc-autoencoder", "refine") and "records" in e]
    assert len(weight_replies) == 3 * len(rounds)  # C (unlabelled) too: its masks must cancel
    for entry in weight_replies:
        dtypes = {a["dtype"] for a in entry["records"]["weights"]["items"].values()}
        assert dtypes == {"int64"}, entry["task"]
    from tests.fl.test_privacy import audit_problems, model_parameters

    parameters = model_parameters(m_best=1)
    assert [p for site, entries in audit.items() for e in entries for p in audit_problems(e, site, parameters)] == []
    keys = {site: e["records"]["control"]["items"][secagg.PUBLIC_KEY]["value"]
            for site, entries in audit.items() for e in entries if e["task"] == "init"}
    assert set(keys) == {"A", "B", "C"} and len(set(keys.values())) == 3
