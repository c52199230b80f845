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


class _Constant(torch.nn.Module):
    """A 'segmenter' that predicts one class everywhere (logits), to check what R is given."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:]) + self.w
        logits[:, self.label] = 1.0
        return logits


def test_segmenter_examples_are_the_candidates_predictions_paired_with_the_truth():
    from fedqc.train.autoencoder import segmenter_examples

    images = torch.randn(10, 16, 16)
    labels = torch.randint(0, 4, (10, 16, 16))
    inputs, targets = segmenter_examples([_Constant(1), _Constant(3)], images, labels, seed=4)
    assert inputs.shape == targets.shape == labels.shape
    # each slice is predicted by one of the two candidates, both are drawn
    per_slice = {int(v) for v in inputs.flatten(1).amax(1)}
    assert per_slice == {1, 3}
    assert all(len(torch.unique(s)) == 1 for s in inputs)
    # targets are the truth under the same spatial shift: the labels' values, not the predictions'
    assert set(torch.unique(targets).tolist()) <= {0, 1, 2, 3}
    again = segmenter_examples([_Constant(1), _Constant(3)], images, labels, seed=4)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    other = segmenter_examples([_Constant(1), _Constant(3)], images, labels, seed=5)
    assert not torch.equal(other[1], targets) or not torch.equal(other[0], inputs)


def test_autoencoder_epoch_trains_on_the_examples_as_given():
    """With examples, R's loss is measured against the examples' targets from the examples' inputs:
    an R that maps everything to background does worse when the examples' targets hold structures."""
    from fedqc.train.autoencoder import autoencoder_one_epoch

    torch.manual_seed(0)
    ae = torch.nn.Conv2d(4, 4, 1)
    opt = torch.optim.SGD(ae.parameters(), lr=0.0)  # no step: the loss is that of fixed weights
    masks = torch.zeros(4, 8, 8, dtype=torch.long)
    empty = (torch.zeros(4, 8, 8, dtype=torch.long), torch.zeros(4, 8, 8, dtype=torch.long))
    full = (torch.zeros(4, 8, 8, dtype=torch.long), torch.full((4, 8, 8), 3, dtype=torch.long))
    a = autoencoder_one_epoch(ae, masks, opt, batch_size=8, generator=make_generator(0, "cpu"), examples=empty)
    b = autoencoder_one_epoch(ae, masks, opt, batch_size=8, generator=make_generator(0, "cpu"), examples=full)
    assert a.num_examples == b.num_examples == 8
    assert b.loss > a.loss


def test_segmenter_examples_only_for_a_corrective_module_that_asks_for_them():
    from pathlib import Path

    import numpy as np

    from fedqc.config import Config, QCConfig, SiteConfig
    from fedqc.train.stages import examples_of

    images, labels = np.zeros((3, 8, 8), np.float32), np.zeros((3, 8, 8), np.uint8)
    models = [_Constant(3)]

    def config(**qc) -> Config:
        return Config(sites=(SiteConfig(name="a", root=Path("."), labelled=True),), qc=QCConfig(**qc))

    assert examples_of(config(), models, images, labels) is None  # default: off
    assert examples_of(config(autoencoder="plain", segmenter_examples=True), models, images, labels) is None
    assert examples_of(config(autoencoder="corrective", segmenter_examples=True), None, images, labels) is None
    made = examples_of(config(autoencoder="corrective", segmenter_examples=True), models, images, labels)
    inputs, targets = made(0)
    assert (inputs == 3).all() and inputs.shape == targets.shape == (3, 8, 8)


def test_whole_mask_warps_off_leaves_every_mask_where_it_was():
    """``qc.whole_mask_warps`` false: the corrective R's inputs keep the structures in place (only the
    local failures remain); on, some masks move as a whole (their untouched structures move too)."""
    from pathlib import Path

    from fedqc.config import Config, QCConfig, SiteConfig
    from fedqc.train.stages import corruption_of

    def inputs(warps: bool) -> torch.Tensor:
        config = Config(sites=(SiteConfig(name="a", root=Path("."), labelled=True),),
                        qc=QCConfig(autoencoder="corrective", whole_mask_warps=warps))
        cfg = corruption_of(config)
        # every failure but the warps off, so whatever still moves a structure is a warp
        local_off = {k: 0.0 for k in ("boxes", "rv_missing", "rv_partial", "fragment", "morphology")}
        only_warps = CorruptionConfig(clean=0.0, **local_off, affine=cfg.affine, elastic=cfg.elastic)
        return corrupt_masks(_masks(64), make_generator(0, torch.device("cpu")), only_warps)

    moved = (inputs(True) != _masks(64).long()).flatten(1).any(1)
    assert int(moved.sum()) >= 8  # on (the default): about half of the masks are moved
    assert torch.equal(inputs(False), _masks(64).long())
    assert corruption_of(Config(sites=(SiteConfig(name="a", root=Path("."), labelled=True),),
                                qc=QCConfig(autoencoder="plain", whole_mask_warps=False))) is None
