"""The QC signal's parts: the consortium's pooled fences, the corrective module's failures."""

from __future__ import annotations

import pytest
import torch

from fedqc.core.device import make_generator
from fedqc.qc.fences import choose_fences
from fedqc.qc.thresholds import (
    ThresholdFitError,
    Thresholds,
    fence_quartiles,
    pooled_fences,
)
from fedqc.train.corrupt import CorruptionConfig, corrupt_masks


def _site(n, pdc_q1, pdc_q3, phd_q1, phd_q3):
    return {"n": n, "pdc_q1": pdc_q1, "pdc_q3": pdc_q3, "phd_q1": phd_q1, "phd_q3": phd_q3}


def test_pooled_fences_weight_each_sites_quartiles_by_its_cases():
    fences = pooled_fences([_site(6, 0.80, 0.90, 4.0, 8.0), _site(2, 0.60, 0.70, 8.0, 12.0)], factor=1.5)
    assert fences.q1_pdc == pytest.approx(0.75) and fences.q3_pdc == pytest.approx(0.85)  # (6*.8+2*.6)/8
    assert fences.th_low_pdc == pytest.approx(0.75 - 1.5 * 0.10)
    assert fences.th_up_phd == pytest.approx(9.0 + 1.5 * 4.0)  # q1 5.0, q3 9.0
    assert fences.n_cases == 8 and fences.source.startswith("consortium")


def test_pooled_fences_of_one_site_are_its_own():
    own = Thresholds(th_low_pdc=0.5, th_up_phd=20.0, q1_pdc=0.7, q3_pdc=0.8, q1_phd=5.0, q3_phd=10.0, factor=1.5,
                     n_cases=7, source="site")
    pooled = pooled_fences([fence_quartiles(own)], factor=1.5)
    assert pooled.th_low_pdc == pytest.approx(0.7 - 0.15) and pooled.th_up_phd == pytest.approx(17.5)


def test_pooled_fences_need_enough_cases():
    with pytest.raises(ThresholdFitError, match="at least"):
        pooled_fences([_site(2, 0.8, 0.9, 1, 2), _site(1, 0.8, 0.9, 1, 2), _site(0, 0, 0, 0, 0)], factor=1.5)


def test_choose_fences_says_when_it_falls_back():
    pool = Thresholds(th_low_pdc=0.1, th_up_phd=50.0, q1_pdc=0.3, q3_pdc=0.5, q1_phd=9.0, q3_phd=20.0, factor=1.5,
                      n_cases=12, source="unlabelled")
    used = choose_fences("consortium", labelled_val=None, unlabelled=lambda: pool, where="site x SA")
    assert used.source == "unlabelled" and used.requested == "consortium" and "unavailable" in used.note
    assert choose_fences("labelled-val", labelled_val=lambda: pool, unlabelled=None, where="x").requested == "consortium"


def _masks(n=16, size=48):
    m = torch.zeros(n, size, size, dtype=torch.uint8)
    m[:, 10:30, 6:20] = 3
    m[:, 12:30, 22:40] = 2
    m[:, 16:26, 26:36] = 1
    return m


def test_corruption_keeps_shape_and_labels_and_spares_the_clean_share():
    masks = _masks(64)
    out = corrupt_masks(masks, make_generator(0, torch.device("cpu")), CorruptionConfig(clean=0.5))
    assert out.shape == masks.shape and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) <= 3
    changed = (out != masks.long()).flatten(1).any(1)
    assert 0 < int(changed.sum()) <= 64 - 16  # about half stay clean; some corrupted ones change


def test_corruption_is_reproducible_per_generator_and_can_remove_the_rv():
    masks = _masks()
    a = corrupt_masks(masks, make_generator(3, torch.device("cpu")))
    b = corrupt_masks(masks, make_generator(3, torch.device("cpu")))
    assert torch.equal(a, b)
    only_rv_loss = CorruptionConfig(clean=0.0, boxes=0.0, rv_missing=1.0, fragment=0.0, morphology=0.0, affine=0.0,
                                    elastic=0.0)
    gone = corrupt_masks(masks, make_generator(0, torch.device("cpu")), only_rv_loss)
    assert not (gone == 3).any() and (gone == 2).sum() == (masks == 2).sum()
