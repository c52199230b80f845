"""Tukey fences (Eq. 3-4): known quartiles, dropping, errors, JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedqc.core.errors import DataError, FedqcError
from fedqc.qc.thresholds import (
    ThresholdFitError,
    Thresholds,
    fit_from_candidates,
    fit_tukey_thresholds,
)


def test_fences_on_known_arrays():
    # n = 6, linear (type 7) quartiles: Q1 at rank 1.25 -> 2.25, Q3 at rank 3.75 -> 4.75, IQR 2.5.
    values = np.array([6.0, 1.0, 4.0, 2.0, 5.0, 3.0])
    th = fit_tukey_thresholds(values / 10, values, factor=1.5, source="site-1")
    assert (th.q1_phd, th.q3_phd) == pytest.approx((2.25, 4.75))
    assert th.th_up_phd == pytest.approx(4.75 + 1.5 * 2.5)  # 8.5
    assert (th.q1_pdc, th.q3_pdc) == pytest.approx((0.225, 0.475))
    assert th.th_low_pdc == pytest.approx(0.225 - 1.5 * 0.25)  # -0.15
    assert (th.factor, th.n_cases, th.source, th.n_dropped) == (1.5, 6, "site-1", 0)


def test_fences_with_other_factor_and_exact_ranks():
    # n = 9: quartile ranks 2 and 6 fall on values 3 and 7.
    values = np.arange(1.0, 10.0)
    th = fit_tukey_thresholds(values, values, factor=3.0)
    assert (th.q1_pdc, th.q3_pdc, th.th_low_pdc, th.th_up_phd) == (3.0, 7.0, -9.0, 19.0)


def test_non_finite_values_are_dropped_and_counted():
    pdc = np.array([0.9, np.nan, 0.8, 0.85, 0.95, 0.7])
    phd = np.array([3.0, 4.0, np.inf, 5.0, 6.0, 7.0])
    th = fit_tukey_thresholds(pdc, phd)
    assert th.n_dropped == 2 and th.n_cases == 6
    assert th.q1_pdc == pytest.approx(np.percentile([0.9, 0.8, 0.85, 0.95, 0.7], 25))
    assert th.q3_phd == pytest.approx(np.percentile([3.0, 4.0, 5.0, 6.0, 7.0], 75))


def test_too_few_values_is_a_clear_error():
    with pytest.raises(ThresholdFitError, match="3 finite pHD values of 5 cases") as err:
        fit_tukey_thresholds(np.ones(5), np.array([1.0, 2.0, np.nan, np.inf, 3.0]), source="site-3")
    assert isinstance(err.value, FedqcError) and isinstance(err.value, ValueError)
    assert "site-3" in str(err.value)
    with pytest.raises(ValueError, match="equal length"):
        fit_tukey_thresholds(np.ones(5), np.ones(4))


def test_fit_from_candidates_uses_best_pdc_and_best_phd_per_case():
    pdc = np.array([[0.5, 0.9], [0.7, 0.6], [0.2, np.nan], [0.8, 0.85], [0.1, 0.3]])
    phd = np.array([[9.0, 4.0], [3.0, 5.0], [np.nan, 8.0], [6.0, 2.0], [7.0, 1.0]])
    th = fit_from_candidates(pdc, phd)
    direct = fit_tukey_thresholds(np.array([0.9, 0.7, 0.2, 0.85, 0.3]), np.array([4.0, 3.0, 8.0, 2.0, 1.0]))
    assert th == direct


def test_json_round_trip_is_atomic_and_readable(tmp_path):
    th = fit_tukey_thresholds(np.linspace(0.6, 0.95, 8), np.linspace(2.0, 15.0, 8), source="site-2/SA/ED")
    path = tmp_path / "thresholds.json"
    th.to_json(path)
    assert Thresholds.from_json(path) == th
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]
    record = json.loads(path.read_text())
    assert record["format"] == "fedqc-thresholds/1" and "linear" in record["quantile_method"]


def test_from_json_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        Thresholds.from_json(bad)
    bad.write_text(json.dumps({"format": "fedqc-thresholds/1", "th_low_pdc": 0.5}))
    with pytest.raises(DataError, match="lacks"):
        Thresholds.from_json(bad)
