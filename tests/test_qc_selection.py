"""OoD flags and QC-based candidate selection (paper Sec. 2.3): every branch, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedqc.qc.ood import candidate_passes, flag_ood
from fedqc.qc.selection import Selection, apply_selection, rank_by_pdc, select_candidate
from fedqc.qc.thresholds import Thresholds

FENCES = Thresholds(
    th_low_pdc=0.7, th_up_phd=10.0, q1_pdc=0.8, q3_pdc=0.9, q1_phd=4.0, q3_phd=6.4,
    factor=1.5, n_cases=20, source="test",
)


def test_ood_needs_every_candidate_to_fail():
    pdc = np.array([
        [0.9, 0.8, 0.75],  # all pass
        [0.5, 0.9, 0.6],  # only candidate 1 passes pDC, and it passes pHD
        [0.6, 0.9, 0.95],  # candidate 0 fails pDC, 1 and 2 fail pHD: no candidate passes both
        [0.1, 0.2, 0.3],  # all fail pDC
        [0.7, 0.5, 0.5],  # on the fences exactly: passes
        [np.nan, 0.9, 0.9],  # NaN fails
    ])
    phd = np.array([
        [3.0, 4.0, 5.0],
        [20.0, 9.0, 30.0],
        [2.0, 11.0, 12.0],
        [1.0, 1.0, 1.0],
        [10.0, 1.0, 1.0],
        [1.0, np.nan, np.inf],
    ])
    np.testing.assert_array_equal(flag_ood(pdc, phd, FENCES), [False, False, True, True, False, True])
    np.testing.assert_array_equal(candidate_passes(pdc, phd, FENCES)[1], [False, True, False])


def test_ood_accepts_one_candidate_per_case():
    np.testing.assert_array_equal(flag_ood([0.9, 0.6], [5.0, 5.0], FENCES), [False, True])


def test_first_ranked_candidate_with_low_phd_is_selected():
    pdc, phd = np.array([0.80, 0.95, 0.90]), np.array([3.0, 4.0, 5.0])
    assert select_candidate(pdc, phd, 10.0) == Selection(index=1)


def test_candidates_with_high_phd_are_skipped_down_the_ranking():
    pdc, phd = np.array([0.80, 0.95, 0.90]), np.array([3.0, 12.0, 11.0])
    assert select_candidate(pdc, phd, 10.0) == Selection(index=0)


def test_phd_equal_to_the_fence_does_not_qualify():
    pdc, phd = np.array([0.95, 0.90]), np.array([10.0, 9.99])
    assert select_candidate(pdc, phd, 10.0) == Selection(index=1)


def test_pdc_ties_are_broken_by_lower_phd_then_index():
    pdc, phd = np.array([0.9, 0.9, 0.9, 0.5]), np.array([6.0, 4.0, 4.0, 1.0])
    np.testing.assert_array_equal(rank_by_pdc(pdc, phd), [1, 2, 0, 3])
    assert select_candidate(pdc, phd, 10.0) == Selection(index=1)


def test_fallback_pairs_best_pdc_and_best_phd():
    pdc, phd = np.array([0.85, 0.95, 0.90]), np.array([11.0, 14.0, 12.0])
    assert select_candidate(pdc, phd, 10.0) == Selection(index=None, fallback_pair=(1, 0))


def test_fallback_ties_and_same_candidate():
    # best pHD tie (11 and 11): the higher pDC wins; here that is also the best-pDC candidate.
    pdc, phd = np.array([0.8, 0.9, 0.7]), np.array([11.0, 11.0, 20.0])
    assert select_candidate(pdc, phd, 10.0) == Selection(index=None, fallback_pair=(1, 1))
    # full tie: lowest index for both.
    assert select_candidate(np.full(3, 0.5), np.full(3, 12.0), 10.0).fallback_pair == (0, 0)


def test_nan_scores_rank_last():
    pdc, phd = np.array([np.nan, 0.6, 0.7]), np.array([1.0, 2.0, np.nan])
    np.testing.assert_array_equal(rank_by_pdc(pdc, phd), [2, 1, 0])
    assert select_candidate(pdc, phd, 10.0) == Selection(index=1)


def test_apply_selection_picks_or_averages_probability_maps():
    probs = np.zeros((3, 4, 2, 2))
    probs[0, 1] = 1.0
    probs[1, 3], probs[1, 2] = 0.7, 0.3  # candidate 1: RV everywhere
    probs[2, 3], probs[2, 2] = 0.4, 0.6  # candidate 2: myocardium, surely so in one pixel
    probs[2, 3, 1, 1], probs[2, 2, 1, 1] = 0.1, 0.9
    np.testing.assert_array_equal(apply_selection(Selection(index=2), probs), probs[2])
    mean = apply_selection(Selection(index=None, fallback_pair=(1, 2)), probs)
    np.testing.assert_allclose(mean, 0.5 * (probs[1] + probs[2]))
    np.testing.assert_array_equal(mean.argmax(axis=0), [[3, 3], [3, 2]])
    as_tensor = apply_selection(Selection(index=None, fallback_pair=(0, 2)), torch.from_numpy(probs))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (4, 2, 2)


def test_selection_holds_exactly_one_outcome():
    with pytest.raises(ValueError):
        Selection(index=1, fallback_pair=(0, 1))
    with pytest.raises(ValueError):
        Selection(index=None)


def test_guarded_selection_keeps_a_passing_m_unless_another_is_clearly_better():
    import numpy as np

    from fedqc.qc.selection import select_candidate

    pdc, phd = np.array([0.80, 0.83, 0.70]), np.array([5.0, 4.0, 6.0])
    assert select_candidate(pdc, phd, 10.0).index == 1  # the paper: best pDC
    assert select_candidate(pdc, phd, 10.0, th_low_pdc=0.5, margin=0.05).index == 0  # within the margin
    assert select_candidate(pdc, phd, 10.0, th_low_pdc=0.5, margin=0.02).index == 1  # clearly better
    failing = np.array([0.40, 0.83, 0.70])
    assert select_candidate(failing, phd, 10.0, th_low_pdc=0.5, margin=0.5).index == 1  # M fails the fences


def test_margin_selection_keeps_m_by_the_margin_even_when_it_is_flagged():
    import numpy as np

    from fedqc.qc.selection import select_candidate

    # Every candidate fails a fence (the case is flagged), none beats M by more than the margin:
    # guarded hands over to the paper's steps (here the fallback), margin keeps M.
    pdc, phd = np.array([0.30, 0.34, 0.33]), np.array([30.0, 12.0, 40.0])
    th_low, th_up = 0.5, 10.0
    assert select_candidate(pdc, phd, th_up, th_low, margin=0.05).fallback_pair == (1, 1)
    assert select_candidate(pdc, phd, th_up, th_low, margin=0.05, m_must_pass=False).index == 0
    # Another candidate clearly better: the paper's steps choose, fences and all.
    better = np.array([0.30, 0.60, 0.33])
    assert select_candidate(better, np.array([30.0, 8.0, 40.0]), th_up, margin=0.05, m_must_pass=False).index == 1
    assert select_candidate(better, phd, th_up, margin=0.05, m_must_pass=False).fallback_pair == (1, 1)
    # A NaN pDC for M never keeps it; guarded selection needs its lower fence.
    nan_m = np.array([np.nan, 0.34, 0.33])
    assert select_candidate(nan_m, np.array([30.0, 8.0, 40.0]), th_up, margin=0.05, m_must_pass=False).index == 1
    with pytest.raises(ValueError, match="th_low_pdc"):
        select_candidate(pdc, phd, th_up, margin=0.05)
