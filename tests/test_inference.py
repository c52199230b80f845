"""The batched QC scoring pass equals case-by-case scoring, on the host and with the device metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedqc.config import QCConfig
from fedqc.data.site import PreparedCase
from fedqc.qc.metrics import pseudo_scores
from fedqc.qc.scoring import (
    reconstruct,
    score_cases,
    scores_on_device,
    scores_on_host,
    segment,
)
from tests.conftest import disc_cases


class Threshold(torch.nn.Module):
    """A 'segmenter' whose labels are the rounded image (plus a shift): exact, known predictions."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        labels = (x[:, 0] + self.shift).round().clamp(0, 3).long()
        return F.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 10


class Blur(torch.nn.Module):
    """An 'autoencoder' that smooths the one-hot maps: reconstructions differ from predictions."""

    def forward(self, onehot):
        return F.avg_pool2d(onehot, 5, 1, 2)


def _cases(rng: np.random.Generator, sizes: list[int], size: int = 40) -> list[PreparedCase]:
    return disc_cases(rng, sizes, size, no_rv=(1,))  # no RV at all in case 1: the empty-structure convention


@pytest.mark.parametrize("classes", ["rv", "foreground"])
def test_batched_scores_equal_case_by_case_scores(classes):
    cfg = QCConfig(classes=classes)
    cases = _cases(np.random.default_rng(0), [5, 3, 1, 7, 1])
    models, ae, device = [Threshold(0.0), Threshold(0.4)], Blur(), torch.device("cpu")
    scores = score_cases(models, ae, cases, cfg, device, batch_size=4)
    labels = (1, 2, 3) if classes == "foreground" else (3,)
    for i, case in enumerate(cases):
        for k, model in enumerate(models):
            pred = segment(model, case.images, device).argmax(1)
            recon = reconstruct(ae, pred).argmax(1)
            pdc, phd = pseudo_scores(pred.numpy().astype(np.uint8), recon.numpy().astype(np.uint8), case.spacing_mm,
                                     labels)
            assert scores.pdc[i, k] == pytest.approx(pdc, abs=1e-9)
            assert scores.phd[i, k] == pytest.approx(phd, abs=1e-6)
    assert scores.pdc[1].max() == 1.0 or classes == "foreground"  # both empty: Dice 1
    assert len(np.unique(scores.pdc)) > 2  # the cases are really scored differently


def test_device_metrics_equal_host_metrics_on_padded_stacks():
    for sizes, planar in (([4, 2, 6], False), ([1, 1, 1], True)):
        cases = _cases(np.random.default_rng(1), sizes)
        x = torch.from_numpy(np.concatenate([c.images for c in cases]))
        preds = torch.stack([Threshold(s)(x[:, None]).argmax(1).to(torch.uint8) for s in (0.0, 0.3)])
        recons = torch.stack([Blur()(F.one_hot(p.long(), 4).permute(0, 3, 1, 2).float()).argmax(1).to(torch.uint8)
                              for p in preds])
        spacing = np.array([c.spacing_mm for c in cases])
        host = scores_on_host(preds.numpy(), recons.numpy(), np.array(sizes), spacing, (1, 2, 3), None)
        device = [v.double().numpy() for v in scores_on_device(preds, recons, np.array(sizes), spacing, planar,
                                                               (1, 2, 3), None)]
        np.testing.assert_allclose(device[0], host[0], atol=1e-9)
        np.testing.assert_allclose(device[1], host[1], atol=1e-5)
