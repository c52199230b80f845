"""Server-side arithmetic: update checks, weighted averaging, FedBN's split, m_best, run-dir files."""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.fl import rundir
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
    path = rundir.save_weights(tmp_path / "c" / "global.npz", weights)
    assert path.stat().st_mode & 0o777 == 0o600
    back = rundir.load_weights(path)
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
