"""Semi-supervised refinement (Eq. 2) on tiny cases with a fixed tiny autoencoder."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedqc.core.device import make_generator
from fedqc.core.errors import ConfigError
from fedqc.models import build_qc_autoencoder, build_segmenter
from fedqc.train.refine import (
    pseudo_ground_truth,
    refine_epoch,
    semi_supervised_loss_on_cases,
)

CPU = torch.device("cpu")


@pytest.fixture
def setup():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cases = [torch.randn(10, 1, 32, 32, generator=gen), torch.randn(3, 1, 32, 32, generator=gen),
             torch.randn(1, 1, 32, 32, generator=gen)]  # 14 slices; the first case is longer than a batch
    images = torch.randn(6, 1, 32, 32, generator=gen)
    labels = torch.randint(0, 4, (6, 32, 32), generator=gen, dtype=torch.uint8)
    return build_segmenter("tiny", 32), build_qc_autoencoder(32).eval(), cases, images, labels


def run(model, ae, cases, images, labels, lr=1e-2, **kwargs):
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    return refine_epoch(model, ae, cases, images, labels, alpha=kwargs.pop("alpha", 1.0), batch_size=4,
                        optimiser=optimiser, generator=make_generator(0, CPU), **kwargs), optimiser


def test_refinement_lowers_the_semi_supervised_loss(setup):
    model, ae, cases, _, _ = setup
    before = semi_supervised_loss_on_cases(model, ae, cases)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = make_generator(0, CPU)
    for _ in range(5):
        refine_epoch(model, ae, cases, None, None, alpha=1.0, batch_size=4, optimiser=optimiser,
                     generator=generator)
    assert semi_supervised_loss_on_cases(model, ae, cases) < before - 0.02


def test_every_flagged_slice_is_used_once_per_epoch(setup):
    model, ae, cases, images, labels = setup
    stats, _ = run(model, ae, cases, images, labels)
    assert stats["n_flagged_slices"] == 14 and stats["steps"] == 4  # ceil(14 / 4)
    assert stats["n_labelled"] == 6  # 4 steps x 4 labelled slices cycle over all 6
    assert stats["semi_loss"] > 0 and stats["sup_loss"] > 0


def test_without_labelled_data_only_the_semi_term(setup):
    model, ae, cases, _, _ = setup
    stats, _ = run(model, ae, cases, None, None)
    assert stats["sup_loss"] == 0.0 and stats["n_labelled"] == 0 and stats["semi_loss"] > 0


def test_nothing_flagged_and_nothing_labelled_changes_nothing(setup):
    model, ae, _, _, _ = setup
    before = [p.detach().clone() for p in model.parameters()]
    stats, _ = run(model, ae, [], None, None)
    assert stats["steps"] == 0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_nothing_flagged_is_the_supervised_term_alone(setup):
    """A labelled site whose pool flags nothing still gives Eq. 2's supervised term: one pass over
    its labelled slices, no semi-supervised loss (the same loop, not a second one)."""
    model, ae, _, images, labels = setup
    before = [p.detach().clone() for p in model.parameters()]
    stats, _ = run(model, ae, [], images, labels)
    assert stats["steps"] == 2 and stats["n_labelled"] == 6 and stats["n_flagged_slices"] == 0  # ceil(6 / 4)
    assert stats["semi_loss"] == 0.0 and stats["sup_loss"] > 0
    assert not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_autoencoder_stays_frozen_and_learning_rate_untouched(setup):
    model, ae, cases, images, labels = setup
    ae.train()  # refine_epoch must run it in eval mode regardless, and restore the caller's mode
    ae_before = {k: v.clone() for k, v in ae.state_dict().items()}
    _, optimiser = run(model, ae, cases, images, labels, lr=3e-3, ae_input="softmax")
    assert all(torch.equal(v, ae.state_dict()[k]) for k, v in ae_before.items())  # incl. BN statistics
    assert ae.training
    assert optimiser.param_groups[0]["lr"] == 3e-3


def test_deep_supervised_segmenter_refines(setup):
    _, ae, cases, images, labels = setup
    model = build_segmenter("dynunet", 32, kwargs={"filters": [4, 8, 16, 32]})
    stats, _ = run(model, ae, cases, images, labels)
    assert math.isfinite(stats["semi_loss"]) and math.isfinite(stats["sup_loss"])


def test_pseudo_ground_truth_is_per_slice(setup):
    _, ae, _, _, _ = setup
    probs = torch.softmax(torch.randn(6, 4, 32, 32), 1)
    for ae_input in ("onehot", "softmax"):
        whole = pseudo_ground_truth(ae, probs, ae_input)
        chunked = torch.cat([pseudo_ground_truth(ae, probs[i:i + 4], ae_input) for i in (0, 4)])
        torch.testing.assert_close(whole, chunked)
    with pytest.raises(ConfigError):
        pseudo_ground_truth(ae, probs, "logits")


def test_numpy_inputs_are_accepted(setup):
    model, ae, cases, images, labels = setup
    stats, _ = run(model, ae, [c.numpy() for c in cases], images.numpy(), labels.numpy().astype(np.uint8))
    assert stats["steps"] == 4


def _step_norm(mode: str, alpha: float, labelled: bool) -> float:
    """Norm of one refinement round's weight change through ``stages.refine_round`` (Adam, fresh)."""
    from types import SimpleNamespace

    from fedqc.config import config_from_dict
    from fedqc.train.stages import refine_round
    from tests.conftest import tiny_config_dict

    config = config_from_dict(tiny_config_dict(Path("."), refine={"semi_only_alpha": mode, "batch_size": 4}))
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    start = build_segmenter("tiny", 32)
    ae = build_qc_autoencoder(32).eval()
    cases = [SimpleNamespace(images=torch.randn(6, 32, 32, generator=gen).numpy()) for _ in range(2)]
    pair = (torch.randn(6, 1, 32, 32, generator=gen).numpy(),
            torch.randint(0, 4, (6, 32, 32), generator=gen, dtype=torch.uint8).numpy()) if labelled else None
    model = copy.deepcopy(start)
    refine_round(config, [model], ae, cases, pair, alpha=alpha, k=1)
    return float(torch.cat([(p - q).detach().flatten() for p, q in zip(model.parameters(), start.parameters())]).norm())


def test_alpha_shrinks_an_unlabelled_sites_step_through_the_learning_rate():
    # Adam normalises a loss's scale away: with alpha in the loss alone ("loss"), an unlabelled site's
    # step is as long at alpha 0.25 as at 1; "lr" (the default) makes it a quarter as long.
    assert _step_norm("loss", 0.25, False) / _step_norm("loss", 1.0, False) == pytest.approx(1.0, abs=0.05)
    assert _step_norm("lr", 0.25, False) / _step_norm("lr", 1.0, False) == pytest.approx(0.25, abs=0.02)
    # With a supervised term in the step, alpha stays in the loss: both settings give the same step.
    assert _step_norm("lr", 0.25, True) == pytest.approx(_step_norm("loss", 0.25, True), rel=1e-6)
