"""Server-side arithmetic: update checks, weighted averaging, FedBN's split, m_best, run-dir files."""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.fl import run_state
from fedqc.fl.aggregation import (
    BestRounds,
    Update,
    check_update,
    local_names,
    select,
    weighted_average,
)
from fedqc.fl.settings import DEFAULT_NORM_PATTERN, FederationSettings


def _ref() -> dict[str, np.ndarray]:
    return {"seg/w": np.zeros(3, np.float32), "seg/bn.running_mean": np.zeros(2, np.float32),
            "seg/bn.num_batches_tracked": np.array(0), "ae/w": np.ones(2, np.float32)}


def test_weighted_average_by_num_examples_keeps_unsent_names_and_dtypes():
    ref = _ref()
    a = Update("A", {"seg/w": np.full(3, 1.0, np.float32), "seg/bn.num_batches_tracked": np.array(10)}, 1)
    b = Update("B", {"seg/w": np.full(3, 4.0, np.float32), "seg/bn.num_batches_tracked": np.array(20)}, 2)
    out = weighted_average([a, b], ref)
    np.testing.assert_allclose(out["seg/w"], 3.0)
    assert out["seg/w"].dtype == np.float32
    assert out["seg/bn.num_batches_tracked"] == 17 and out["seg/bn.num_batches_tracked"].dtype == ref[
        "seg/bn.num_batches_tracked"].dtype
    np.testing.assert_array_equal(out["ae/w"], ref["ae/w"])
    assert set(out) == set(ref)
    with pytest.raises(ValueError):
        weighted_average([], ref)


def test_check_update_refuses_unknown_names_shapes_non_finite_and_bad_weights():
    ref = _ref()
    assert check_update(Update("A", {"seg/w": np.ones(3, np.float32)}, 5), ref) is None
    assert "unknown" in check_update(Update("A", {"seg/extra": np.ones(3)}, 5), ref)
    assert "shape" in check_update(Update("A", {"seg/w": np.ones(4, np.float32)}, 5), ref)
    assert "NaN" in check_update(Update("A", {"seg/w": np.array([1, np.nan, 0], np.float32)}, 5), ref)
    assert "positive" in check_update(Update("A", {"seg/w": np.ones(3, np.float32)}, 0), ref)


def test_fedbn_norm_names_match_common_layouts_but_not_convolutions_or_the_autoencoder():
    names = ["seg/SA/1.weight", "seg/SA/1.running_mean", "seg/SA/bn1.weight", "seg/SA/model.0.conv.unit0.adn.N.weight",
             "seg/SA/enc.norm.bias", "m0/seg/SA/layer_norm.weight", "seg/SA/conv.weight", "seg/SA/0.weight",
             "ae/SA/bn.weight", "seg/SA/1.num_batches_tracked"]
    local = local_names(names, DEFAULT_NORM_PATTERN)
    assert local == {"seg/SA/1.running_mean", "seg/SA/bn1.weight", "seg/SA/model.0.conv.unit0.adn.N.weight",
                     "seg/SA/enc.norm.bias", "m0/seg/SA/layer_norm.weight", "seg/SA/1.num_batches_tracked"}


def test_select_by_prefix():
    ref = _ref()
    assert set(select(ref, "ae/")) == {"ae/w"}
    assert "ae/w" not in select(ref, exclude_prefix="ae/")


def test_best_rounds_keep_the_m_best_and_the_round_waiting_for_its_score():
    best = BestRounds(2)
    for r, score in [(1, 0.5), (2, 0.7), (3, 0.6)]:
        best.add(r)
        best.score(r, score)
    best.add(4)
    assert best.best() == [2, 3]
    assert best.keep() == {2, 3, 4}
    best.score(4, 0.1)
    assert best.keep() == {2, 3}
    assert BestRounds.from_json(best.to_json()) == best
    unscored = BestRounds(2)
    for r in (1, 2, 3):
        unscored.add(r)
    assert unscored.best() == [3, 2]


def test_alpha_schedules():
    assert FederationSettings(alpha="inverse", refine_rounds=4).alpha_at(2) == 0.5
    assert FederationSettings(alpha="linear", refine_rounds=4).alpha_at(1) == 1.0
    assert FederationSettings(alpha="linear", refine_rounds=4).alpha_at(4) == 0.25


def test_weights_files_are_atomic_private_and_exact(tmp_path):
    weights = {"m0/seg/SA/w": np.arange(6, dtype=np.float32).reshape(2, 3), "ae/n": np.array(3)}
    path = run_state.save_arrays(tmp_path / "c" / "global.npz", weights)
    assert path.stat().st_mode & 0o777 == 0o600
    back = run_state.load_arrays(path)
    assert set(back) == set(weights)
    np.testing.assert_array_equal(back["m0/seg/SA/w"], weights["m0/seg/SA/w"])
    assert not list(path.parent.glob(".*tmp"))


def test_eq2_average_steps_on_both_terms_of_eq2():
    """Semi-supervised sites are averaged by flagged slices, supervised-only sites by labelled slices,
    and the two group steps add up: the first-order step of alpha * S + U over the consortium."""
    from fedqc.fl.aggregation import Update, eq2_average

    ref = {"w": np.zeros(2, np.float32), "count": np.array([5], np.int64)}
    updates = [Update("u1", {"w": np.full(2, 1.0, np.float32)}, 2),   # 2 flagged slices
               Update("u2", {"w": np.full(2, 3.0, np.float32)}, 6),   # 6 flagged slices
               Update("lab", {"w": np.full(2, -1.0, np.float32)}, 10)]  # 10 labelled slices, nothing flagged
    new = eq2_average(updates, ref, labelled={"lab": 10})
    assert np.allclose(new["w"], 2 / 8 * 1 + 6 / 8 * 3 - 1.0)  # 1.5
    assert new["w"].dtype == np.float32 and new["count"][0] == 5
    # With one group only it is the usual weighted average of that group.
    semi_only = eq2_average(updates[:2], ref, labelled={})
    assert np.allclose(semi_only["w"], 2.5)


# -- poisoned or broken updates, robust aggregation (fedqc.fl.robust) -----------------------------


def _honest(n: int = 4, seed: int = 0) -> tuple[dict[str, np.ndarray], list[Update]]:
    """A global model and ``n`` honest updates: small steps from it, different example counts."""
    rng = np.random.default_rng(seed)
    ref = {"seg/w": rng.standard_normal((3, 4)).astype(np.float32), "seg/b": np.zeros(4, np.float32),
           "seg/bn.num_batches_tracked": np.array(100, np.int64), "ae/w": np.ones(2, np.float32)}
    updates = [Update(f"h{i}", {"seg/w": ref["seg/w"] + 0.01 * rng.standard_normal((3, 4)).astype(np.float32),
                                "seg/b": 0.01 * rng.standard_normal(4).astype(np.float32),
                                "seg/bn.num_batches_tracked": np.array(100 + 10 * (i + 1), np.int64)}, 10 + i)
               for i in range(n)]
    return ref, updates


@pytest.mark.parametrize("poison", ["norm x1000", "nan", "int dtype", "shape"])
def test_a_poisoned_site_among_four_honest_ones_is_rejected_and_the_global_is_the_honest_mean(poison):
    from fedqc.fl.robust import screen_updates

    ref, honest = _honest()
    bad = {k: v.copy() for k, v in honest[0].weights.items()}
    if poison == "norm x1000":
        bad = {k: (ref[k] + 1000 * (v - ref[k]) if v.dtype.kind == "f" else v) for k, v in bad.items()}
    elif poison == "nan":
        bad["seg/b"][1] = np.nan
    elif poison == "int dtype":
        bad["seg/w"] = np.rint(bad["seg/w"]).astype(np.int32)
    else:
        bad["seg/w"] = np.zeros((4, 3), np.float32)
    evil = Update("evil", bad, 1000)
    screened = screen_updates([honest[0], evil, *honest[1:]], ref, norm_factor=10.0)
    assert list(screened.rejected) == ["evil"]
    assert {"norm x1000": "norm", "nan": "NaN", "int dtype": "dtype", "shape": "shape"}[poison] in \
        screened.rejected["evil"]
    assert [u.site for u in screened.kept] == ["h0", "h1", "h2", "h3"]
    new, expected = weighted_average(screened.kept, ref), weighted_average(honest, ref)
    assert set(new) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(new[name], expected[name])
        assert new[name].dtype == ref[name].dtype
    assert "limit" in screened.norm_check and set(screened.norms) == {"h0", "h1", "h2", "h3"} | (
        {"evil"} if poison == "norm x1000" else set())


def test_check_update_refuses_the_wrong_dtype_kind_but_accepts_any_float_precision():
    ref = _ref()
    assert check_update(Update("A", {"seg/w": np.ones(3, np.float16)}, 1), ref) is None
    assert check_update(Update("A", {"seg/bn.num_batches_tracked": np.array(3, np.int32)}, 1), ref) is None
    assert "dtype" in check_update(Update("A", {"seg/w": np.ones(3, np.int64)}, 1), ref)
    assert "dtype" in check_update(Update("A", {"seg/w": np.ones(3, np.complex64)}, 1), ref)
    assert "dtype" in check_update(Update("A", {"seg/bn.num_batches_tracked": np.array(3.5)}, 1), ref)
    assert "numpy array" in check_update(Update("A", {"seg/w": [0.0, 0.0, 0.0]}, 1), ref)


def test_norm_rule_needs_three_updates_a_positive_median_and_can_be_disabled():
    from fedqc.fl.robust import norm_outliers, screen_updates

    assert norm_outliers({"a": 1.0, "b": 1e6}, 10.0) == ({}, "skipped: 2 update(s), the median rule needs 3")
    assert norm_outliers({"a": 0.0, "b": 0.0, "c": 5.0}, 10.0)[1] == "skipped: median update norm is 0"
    assert norm_outliers({"a": 1.0, "b": 1.0, "c": 1e6}, 0.0) == ({}, "off (norm_factor 0)")
    rejected, note = norm_outliers({"a": 1.0, "b": 2.0, "c": 20.1, "d": 3.0}, 8.0)  # median 2.5, limit 20
    assert list(rejected) == ["c"] and "limit 20" in note
    ref, honest = _honest(3)
    big = Update("big", {k: (ref[k] + 1000 * (v - ref[k]) if v.dtype.kind == "f" else v)
                         for k, v in honest[0].weights.items()}, 10)
    assert screen_updates([honest[0], big], ref, 10.0).rejected == {}  # two updates: not screened
    assert list(screen_updates([*honest, big], ref, 10.0).rejected) == ["big"]
    assert screen_updates([*honest, big], ref, 0.0).rejected == {}


def test_median_and_trimmed_mean_equal_flowers_own_functions():
    from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    from fedqc.fl.robust import robust_average

    rng = np.random.default_rng(3)
    names = ["seg/a", "seg/b"]
    ref = {"seg/a": np.zeros((5, 3), np.float32), "seg/b": np.zeros(7, np.float32)}
    for n in (3, 4, 5, 6, 7, 10):
        updates = [Update(f"s{i}", {k: rng.standard_normal(ref[k].shape).astype(np.float32) for k in names},
                          int(rng.integers(1, 50))) for i in range(n)]
        results = [([u.weights[k] for k in names], int(u.num_examples)) for u in updates]
        median = robust_average(updates, ref, "median")
        for ours, theirs in zip([median[k] for k in names], aggregate_median(results)):
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
        for fraction in (0.0, 0.1, 0.2, 0.25, 0.3, 0.49):
            trimmed = robust_average(updates, ref, "trimmed-mean", fraction)
            for k, theirs in zip(names, aggregate_trimmed_avg(results, fraction)):
                np.testing.assert_allclose(trimmed[k], theirs, rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(trimmed[k], trim_mean(np.stack([u.weights[k] for u in updates]), fraction),
                                           rtol=1e-6, atol=1e-7)
                assert trimmed[k].dtype == np.float32


def test_robust_average_keeps_unsent_names_and_rounds_integer_buffers():
    from fedqc.fl.robust import robust_average

    ref = _ref()
    ups = [Update(s, {"seg/w": np.full(3, v, np.float32), "seg/bn.num_batches_tracked": np.array(c)}, 1)
           for s, v, c in [("A", 1.0, 10), ("B", 2.0, 11), ("C", 9.0, 40)]]
    out = robust_average(ups, ref, "median")
    np.testing.assert_array_equal(out["seg/w"], 2.0)
    assert out["seg/bn.num_batches_tracked"] == 11 and out["seg/bn.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(out["ae/w"], ref["ae/w"])
    np.testing.assert_array_equal(out["seg/bn.running_mean"], ref["seg/bn.running_mean"])
    assert set(out) == set(ref)
    with pytest.raises(ValueError):
        robust_average([], ref, "median")
    with pytest.raises(ValueError):
        robust_average(ups, ref, "mean")


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_one_scaled_up_attacker_moves_robust_aggregates_far_less_than_the_mean(method):
    from fedqc.fl.robust import robust_average

    ref, honest = _honest(5, seed=7)
    attacker = Update("evil", {k: (ref[k] + 100 * (v - ref[k]) if v.dtype.kind == "f" else v)
                               for k, v in honest[0].weights.items()}, 10)
    clean_mean = weighted_average(honest, ref)
    clean_robust = robust_average(honest, ref, method)  # 6 updates with 0.2: one dropped at each end

    def shift(a, b):
        return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in ("seg/w", "seg/b"))))

    moved_mean = shift(weighted_average([*honest, attacker], ref), clean_mean)
    moved_robust = shift(robust_average([*honest, attacker], ref, method), clean_robust)
    assert moved_robust < moved_mean / 10


def test_federation_settings_validate_the_robust_options():
    from fedqc.core.errors import ConfigError

    FederationSettings(aggregation="median", norm_factor=0.0)
    for bad, key in [({"aggregation": "krum"}, "aggregation"), ({"trim_fraction": 0.5}, "trim_fraction"),
                     ({"norm_factor": 0.5}, "norm_factor"), ({"norm_factor": float("nan")}, "norm_factor")]:
        with pytest.raises(ConfigError, match=f"federation.{key}"):
            FederationSettings(**bad)


def test_each_view_is_averaged_over_the_sites_that_trained_it_by_its_own_slices():
    """REFINE: site B trained SA only (it flagged no LA case) and sent no LA weights. LA is A's and
    C's update weighted by their LA slices, not pulled toward the start by B's SA slices; SA is
    weighted by SA slices; eq2 runs per view with each view's labelled counts."""
    from fedqc.fl.aggregation import ViewCounts, eq2_average, split_by_view

    ref = {"m0/seg/SA/w": np.zeros(2, np.float32), "m0/seg/LA/w": np.zeros(2, np.float32),
           "ae/SA/w": np.ones(1, np.float32)}
    a = Update("A", {"m0/seg/SA/w": np.full(2, 1.0, np.float32), "m0/seg/LA/w": np.full(2, 2.0, np.float32)}, 12)
    b = Update("B", {"m0/seg/SA/w": np.full(2, 4.0, np.float32)}, 30)
    c = Update("C", {"m0/seg/SA/w": np.full(2, 0.0, np.float32), "m0/seg/LA/w": np.full(2, 5.0, np.float32)}, 12)
    counts = {"A": {"SA": ViewCounts(10), "LA": ViewCounts(2)}, "B": {"SA": ViewCounts(30), "LA": ViewCounts(0)},
              "C": {"SA": ViewCounts(6, 6), "LA": ViewCounts(6, 6)}}
    groups = split_by_view([a, b, c], counts)
    assert [(view, [u.site for u in ups]) for view, ups, _ in groups] == [("LA", ["A", "C"]), ("SA", ["A", "B", "C"])]
    out = ref
    for _, ups, _ in groups:
        out = weighted_average(ups, out)
    np.testing.assert_allclose(out["m0/seg/LA/w"], (2 * 2.0 + 6 * 5.0) / 8)  # not (12 * 2 + 12 * 5) / 24
    np.testing.assert_allclose(out["m0/seg/SA/w"], (10 * 1.0 + 30 * 4.0 + 6 * 0.0) / 46)
    np.testing.assert_array_equal(out["ae/SA/w"], ref["ae/SA/w"])
    # The old weighting (one count per site over both views), for contrast: LA pulled toward the start.
    whole = weighted_average([a, b, c], ref)
    assert whole["m0/seg/LA/w"][0] < out["m0/seg/LA/w"][0] - 0.1
    # eq2 per view: C's labelled slices make it the supervised group of each view.
    la = next(g for g in groups if g[0] == "LA")
    stepped = eq2_average(la[1], ref, la[2])
    np.testing.assert_allclose(stepped["m0/seg/LA/w"], 2.0 + 5.0)  # A's semi step (alone) + C's supervised step
    with pytest.raises(ValueError, match="view LA"):
        split_by_view([Update("B", {"m0/seg/LA/w": np.ones(2, np.float32)}, 3)], {"B": {"SA": ViewCounts(3)}})


def test_secure_aggregation_weights_each_view_by_its_own_slices(tmp_path):
    """The masked path gives the plain path's per-view mean: each site scales a view by that view's
    slices (0 for a view it did not train), and the coordinator divides by the view's total."""
    from fedqc.fl import secagg
    from fedqc.fl.aggregation import ViewCounts, name_totals, split_by_view

    keys = {node: secagg.site_key(tmp_path / f"site{node}", run_id=3) for node in (1, 2, 3)}
    peers = {node: secagg.public_hex(k) for node, k in keys.items()}
    rng = np.random.default_rng(1)
    names = ("m0/seg/SA/w", "m0/seg/LA/w")
    trained = {1: names, 2: names[:1], 3: names}
    counts = {1: {"SA": ViewCounts(10), "LA": ViewCounts(2)}, 2: {"SA": ViewCounts(30), "LA": ViewCounts(0)},
              3: {"SA": ViewCounts(6), "LA": ViewCounts(6)}}
    updates = {n: {name: rng.normal(size=3).astype(np.float32) for name in trained[n]} for n in keys}
    ref = {name: np.zeros(3, np.float32) for name in names}
    from fedqc.fl.site_runner import secure_weights

    masked = []
    for n in keys:  # as fedqc.fl.site_runner._secure: every name, zeros with weight 0 where not trained
        full = {name: updates[n].get(name, np.zeros(3, np.float32)) for name in names}
        metrics = {"num-examples": sum(c.num_examples for c in counts[n].values()),
                   **{f"num-examples-{view}": c.num_examples for view, c in counts[n].items()}}
        weight = secure_weights(full, updates[n], metrics)
        assert weight["m0/seg/LA/w"] == (0.0 if n == 2 else counts[n]["LA"].num_examples)
        masked.append(secagg.mask(full, weight, n, keys[n], peers, "t"))
    # Without per-view counts (SUPERVISED, AE): every trained name by the total, untrained ones 0.
    assert secure_weights(names, {"m0/seg/SA/w": 1}, {"num-examples": 7}) == {"m0/seg/SA/w": 7.0, "m0/seg/LA/w": 0.0}
    sums = secagg.unmask_sum(masked)
    totals = name_totals(sums, list(counts.values()), total=56.0)
    assert totals == {"m0/seg/SA/w": 46.0, "m0/seg/LA/w": 8.0}
    plain = ref
    for _, ups, _ in split_by_view([Update(str(n), updates[n], 1.0) for n in keys],
                                   {str(n): c for n, c in counts.items()}):
        plain = weighted_average(ups, plain)
    for name in names:
        np.testing.assert_allclose(sums[name] / totals[name], plain[name], atol=1e-5)
    # A site that reported only a total (no per-view counts): every name is divided by the total.
    assert name_totals(sums, [counts[1], {}], total=56.0) == {name: 56.0 for name in names}


def test_server_step_scales_the_mean_step_of_parameters_but_not_normalisation_statistics():
    from fedqc.fl.aggregation import server_step

    start = {"m0/seg/SA/conv.weight": np.zeros(3, np.float32), "m0/seg/SA/bn.running_var": np.ones(2, np.float32),
             "m0/seg/SA/bn.num_batches_tracked": np.array(4), "ae/SA/w": np.ones(2, np.float32)}
    mean = {"m0/seg/SA/conv.weight": np.full(3, 0.5, np.float32), "m0/seg/SA/bn.running_var": np.full(2, 0.2, np.float32),
            "m0/seg/SA/bn.num_batches_tracked": np.array(9), "ae/SA/w": np.ones(2, np.float32)}
    out = server_step(start, mean, 2.0)
    np.testing.assert_allclose(out["m0/seg/SA/conv.weight"], 1.0)  # twice the mean step: the sum of two sites' steps
    assert out["m0/seg/SA/conv.weight"].dtype == np.float32
    np.testing.assert_allclose(out["m0/seg/SA/bn.running_var"], 0.2)  # extrapolated it would be -0.6
    assert out["m0/seg/SA/bn.num_batches_tracked"] == 9
    np.testing.assert_array_equal(out["ae/SA/w"], start["ae/SA/w"])  # nothing moved, nothing moves
    assert all(np.array_equal(server_step(start, mean, 1.0)[k], mean[k]) for k in mean)


def test_refine_server_lr_is_validated_and_reaches_the_settings(tmp_path):
    from fedqc.config import config_from_dict
    from fedqc.core.errors import ConfigError
    from fedqc.fl.from_config import federation_settings

    site = [{"name": "a", "root": str(tmp_path), "labelled": True}]
    config = config_from_dict({"sites": site, "federation": {"refine_server_lr": 2.0}})
    assert federation_settings(config).refine_server_lr == 2.0
    assert federation_settings(config_from_dict({"sites": site})).refine_server_lr == 1.0
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="refine_server_lr"):
            config_from_dict({"sites": site, "federation": {"refine_server_lr": bad}})
    with pytest.raises(ConfigError, match="refine_server_lr"):
        FederationSettings(refine_server_lr=0.0)
