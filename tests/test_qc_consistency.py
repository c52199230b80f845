"""pTC (qc.consistency: tta): the score, its fence, and its way through the scoring pass, the
predict path, the consortium's fences and a real site's tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedqc.config import QCConfig, config_from_dict
from fedqc.core.errors import ConfigError
from fedqc.qc.ood import flag_ood
from fedqc.qc.scoring import candidate_consistency, score_cases, segment
from fedqc.qc.thresholds import (
    Thresholds,
    fence_quartiles,
    fit_from_candidates,
    pooled_fences,
)
from fedqc.site.contract import ALLOWED_METRIC_KEYS, Task, candidate_prefix
from tests.conftest import disc_cases, site_algos, tiny_config_dict


class Rounding(torch.nn.Module):
    """Labels = the rounded image: pixel-wise, so a flip moves its output with the image, and the gammas
    on min-max normalised slices keep 0..3 images' labels (see the test)."""

    def forward(self, x):
        labels = x[:, 0].round().clamp(0, 3).long()
        return F.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 10


class LeftHalf(Rounding):
    """The same, but it calls RV only in the left half of the slice: a flip on the last axis breaks it."""

    def forward(self, x):
        out = super().forward(x)
        out[..., out.shape[-1] // 2:] = torch.tensor([10.0, 0, 0, 0])[:, None, None]
        return out


class Blur(torch.nn.Module):
    def forward(self, onehot):
        return F.avg_pool2d(onehot, 5, 1, 2)


def _cases(sizes=(4, 1, 3)):
    return disc_cases(np.random.default_rng(0), sizes, size=32, r_max=7, full_range=True)


def test_a_consistent_segmenter_scores_one_and_an_inconsistent_one_less():
    cases, device = _cases(), torch.device("cpu")
    scores = score_cases([Rounding(), LeftHalf()], Blur(), cases, QCConfig(consistency="tta"), device)
    assert scores.ptc.shape == (3, 2)
    assert np.allclose(scores.ptc[:, 0], 1.0)
    assert (scores.ptc[:, 1] < 0.95).all()  # the flips put the RV in the other half
    assert QCConfig().consistency == "tta"  # the default (docs/RESULTS.md, "pTC")
    assert score_cases([Rounding()], Blur(), cases, QCConfig(consistency="off"), device).ptc is None  # off: none


def test_the_predict_path_scores_the_same_ptc_as_the_scoring_pass():
    cases, device, cfg = _cases(), torch.device("cpu"), QCConfig(consistency="tta")
    models = [Rounding(), LeftHalf()]
    scores = score_cases(models, Blur(), cases, cfg, device)
    for i, case in enumerate(cases):
        preds = np.stack([segment(m, case.images, device).argmax(1).numpy() for m in models])
        assert candidate_consistency(models, case, preds, cfg, device) == pytest.approx(scores.ptc[i])
    assert candidate_consistency(models, case, preds, QCConfig(consistency="off"), device) is None


def _fences(ptc=True) -> Thresholds:
    pdc = np.array([[0.8, 0.7], [0.9, 0.6], [0.85, 0.8], [0.7, 0.75], [0.95, 0.9]])
    phd = np.full_like(pdc, 5.0)
    ptc_values = np.array([[0.9, 0.8], [0.95, 0.9], [0.92, 0.9], [0.88, 0.8], [0.97, 0.9]]) if ptc else None
    return fit_from_candidates(pdc, phd, 1.5, "test", ptc=ptc_values)


def test_the_ptc_fence_is_tukeys_lower_fence_on_each_cases_best_candidate_and_survives_json(tmp_path):
    th = _fences()
    best = np.array([0.9, 0.95, 0.92, 0.88, 0.97])
    q1, q3 = np.percentile(best, [25, 75])
    assert th.q1_ptc == pytest.approx(q1) and th.th_low_ptc == pytest.approx(q1 - 1.5 * (q3 - q1))
    th.to_json(tmp_path / "SA.json")
    assert Thresholds.from_json(tmp_path / "SA.json") == th
    assert _fences(ptc=False).th_low_ptc is None


def test_a_candidate_that_passes_pdc_and_phd_but_not_ptc_is_flagged():
    th = _fences()
    pdc, phd = np.array([[0.9]]), np.array([[5.0]])
    low, high = np.array([[th.th_low_ptc - 0.01]]), np.array([[th.th_low_ptc + 0.01]])
    assert flag_ood(pdc, phd, th, low)[0] and not flag_ood(pdc, phd, th, high)[0]
    assert not flag_ood(pdc, phd, th)[0]  # scores without pTC: judged on pDC / pHD alone
    assert not flag_ood(pdc, phd, _fences(ptc=False), low)[0]  # fences without pTC: likewise


def test_the_consortium_pools_ptc_only_when_every_site_sent_it():
    a, b = fence_quartiles(_fences()), fence_quartiles(_fences())
    assert {"ptc_q1", "ptc_q3"} <= a.keys()
    b["ptc_q1"], b["ptc_q3"] = 0.5, 0.7
    pooled = pooled_fences([a, b], 1.5)
    q1, q3 = (a["ptc_q1"] + 0.5) / 2, (a["ptc_q3"] + 0.7) / 2  # equal counts
    assert pooled.th_low_ptc == pytest.approx(q1 - 1.5 * (q3 - q1))
    assert pooled_fences([a, fence_quartiles(_fences(ptc=False))], 1.5).th_low_ptc is None


def test_an_unknown_consistency_is_refused_naming_the_key(tiny_data):
    with pytest.raises(ConfigError, match="qc.consistency"):
        config_from_dict(tiny_config_dict(tiny_data, qc={"consistency": "mc-dropout"}))


def test_a_real_labelled_site_sends_ptc_quartiles_and_an_unlabelled_one_flags_with_them(tiny_data, tmp_path):
    """FENCES at the labelled site: pTC quartiles, allowed keys only; REFINE at the unlabelled site with
    the pooled fences: its kept fences carry the pTC fence, and a pTC fence above every case flags all."""
    config = config_from_dict(tiny_config_dict(tiny_data, views=["SA"],
                                               qc={"consistency": "tta", "threshold_source": "consortium"}))
    labelled, unlabelled = site_algos(config, tmp_path)
    weights = labelled.run(Task.SUPERVISED, None, {"local-epochs": 0, "seed": 0}).weights
    weights = labelled.run(Task.SUPERVISED, weights, {"local-epochs": 1, "phase-round": 1}).weights
    ae = labelled.run(Task.QC_AUTOENCODER, None, {"local-epochs": 0, "seed": 0}).weights
    ae = labelled.run(Task.QC_AUTOENCODER, ae, {"local-epochs": 1, "phase-round": 1}).weights
    candidates = {candidate_prefix(i) + k: v for i in range(2) for k, v in weights.items()}
    reply = labelled.run(Task.FENCES, {**candidates, **ae}, {"num-candidates": 2})
    assert {"fence-SA-ptc_q1", "fence-SA-ptc_q3"} <= reply.metrics.keys() <= ALLOWED_METRIC_KEYS
    stats = {k.split("-", 2)[2]: float(v) for k, v in reply.metrics.items() if k.startswith("fence-SA-")}
    assert 0.0 <= stats["ptc_q1"] <= stats["ptc_q3"] <= 1.0
    pooled = pooled_fences([stats], 1.5)
    # Move the pTC fence above every possible score: the unlabelled site must flag its whole pool.
    strict = {**pooled.__dict__, "th_low_pdc": -1.0, "th_up_phd": 1e9, "th_low_ptc": 1.01}
    refine = unlabelled.run(Task.REFINE, {**candidates, **ae},
                            {"local-epochs": 1, "alpha": 1.0, "num-candidates": 2,
                             "consortium-fences": json.dumps({"SA": strict})})
    assert refine.metrics["num-flagged"] == refine.metrics["num-cases"] > 0
    kept = Thresholds.from_json(tmp_path / "centre2" / "thresholds" / "SA.json")
    assert kept.th_low_ptc == pytest.approx(1.01)


@pytest.mark.parametrize("fence", [0.5, 0.9, 0.999, 1.01])
def test_the_predict_path_flags_as_if_it_had_scored_every_candidate(tiny_data, fence):
    """predict_case scores pTC only where it decides the flag; the flag must be the full scoring's."""
    import dataclasses

    from fedqc.predict.case import predict_case

    config = config_from_dict(tiny_config_dict(tiny_data, qc={"consistency": "tta"}))
    cases, device = _cases(sizes=(4, 1, 3, 2)), torch.device("cpu")
    models = [LeftHalf(), Rounding(), LeftHalf()]
    scores = score_cases(models, Blur(), cases, config.qc, device)
    th = dataclasses.replace(_fences(), th_low_pdc=float(np.median(scores.pdc)), th_up_phd=1e9, th_low_ptc=fence)
    full = flag_ood(scores.pdc, scores.phd, th, scores.ptc)
    for i, case in enumerate(cases):
        result = predict_case(config, models, Blur(), case, th, device)
        assert result.ood == full[i]
        if result.selected is not None:  # the output's own pTC is always scored
            assert result.ptc[result.selected] == pytest.approx(scores.ptc[i, result.selected])
    if fence > 1:
        assert full.all()  # no pTC reaches the fence
    if fence == 0.5:
        assert not full.all()  # the consistent candidate passes where its pDC does
