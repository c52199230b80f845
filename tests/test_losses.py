"""Known answers for the losses, agreement with MONAI, deep supervision and the alpha schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import GeneralizedDiceLoss

from fedqc.core.errors import ConfigError
from fedqc.core.types import Label
from fedqc.train.losses import (
    alpha_schedule,
    class_weights_with_rv,
    deep_supervised,
    deep_supervision_weights,
    generalized_dice_loss,
    one_hot,
    qc_autoencoder_loss,
    semi_supervised_term,
    supervised_loss,
)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 16, 16, generator=gen)
    labels = torch.randint(0, 3, (3, 16, 16), generator=gen)  # class 3 absent: exercises the inf weights
    labels[0, :4, :4] = 3
    return logits, labels


def test_generalized_dice_known_answer():
    # 4 pixels: reference 3 x class 0 and 1 x class 1; prediction all class 0.
    # w = (1/9, 1); GD = 1 - 2 * (3/9) / (7/9 + 1) = 0.625
    target = one_hot(torch.tensor([[[0, 0, 0, 1]]]), 2)
    probs = one_hot(torch.tensor([[[0, 0, 0, 0]]]), 2)
    assert generalized_dice_loss(probs, target).item() == pytest.approx(0.625, abs=1e-5)
    assert generalized_dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("batch_mode", [True, False])
@pytest.mark.parametrize("background", [True, False])
def test_generalized_dice_matches_monai(batch, batch_mode, background):
    logits, labels = batch
    ours = generalized_dice_loss(torch.softmax(logits, 1), one_hot(labels), include_background=background,
                                 batch=batch_mode)
    monai = GeneralizedDiceLoss(include_background=background, to_onehot_y=True, softmax=True,
                                w_type="square", batch=batch_mode)(logits, labels[:, None])
    torch.testing.assert_close(ours, monai)


def test_supervised_loss_is_generalized_dice_plus_cross_entropy(batch):
    logits, labels = batch
    gd = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, batch=True)(logits, labels[:, None])
    torch.testing.assert_close(supervised_loss(logits, labels), gd + F.cross_entropy(logits, labels))


def test_uniform_class_weights_change_nothing(batch):
    logits, labels = batch
    probs, target = torch.softmax(logits, 1), one_hot(labels)
    torch.testing.assert_close(generalized_dice_loss(probs, target, torch.full((4,), 3.0)),
                               generalized_dice_loss(probs, target))


def test_rv_weight_penalises_rv_errors_more():
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[0, 2:8, 2:8], target[0, 8:14, 8:14] = Label.LV, Label.RV
    rv_wrong, lv_wrong = target.clone(), target.clone()
    rv_wrong[0, 8:14, 8:11] = 0
    lv_wrong[0, 2:8, 2:5] = 0
    plain, rv3 = torch.ones(4), class_weights_with_rv(3.0)
    ref = one_hot(target)
    for wrong, worse in ((rv_wrong, True), (lv_wrong, False)):
        weighted = generalized_dice_loss(one_hot(wrong), ref, rv3)
        unweighted = generalized_dice_loss(one_hot(wrong), ref, plain)
        assert (weighted > unweighted) == worse


def test_semi_term_does_not_backpropagate_into_the_pseudo_target():
    probs = torch.softmax(torch.randn(2, 4, 8, 8, requires_grad=True), 1)
    target = torch.softmax(torch.randn(2, 4, 8, 8), 1).requires_grad_()
    probs.retain_grad()
    semi_supervised_term(probs, target, class_weights_with_rv(2.0)).backward()
    assert target.grad is None and probs.grad is not None


def test_qc_autoencoder_loss_is_zero_for_perfect_reconstruction(batch):
    _, labels = batch
    assert qc_autoencoder_loss(one_hot(labels), labels).item() == pytest.approx(0.0, abs=1e-6)
    assert qc_autoencoder_loss(torch.full((3, 4, 16, 16), 0.25), labels).item() > 0.5


def test_deep_supervision_weights_as_nnunet():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert sum(deep_supervision_weights(6)) == pytest.approx(1.0)


def test_deep_supervised_stacked_heads(batch):
    logits, labels = batch
    stacked = torch.stack([logits, logits.flip(-1), torch.full_like(logits, float("nan"))], dim=1)
    expected = 2 / 3 * supervised_loss(logits, labels) + 1 / 3 * supervised_loss(logits.flip(-1), labels)
    torch.testing.assert_close(deep_supervised(supervised_loss, stacked, labels), expected)  # NaN head skipped
    torch.testing.assert_close(deep_supervised(supervised_loss, logits, labels), supervised_loss(logits, labels))


def test_deep_supervised_list_of_resolutions_downsamples_labels(batch):
    logits, labels = batch
    heads = [logits, logits[:, :, ::2, ::2], logits[:, :, ::4, ::4]]
    loss = deep_supervised(supervised_loss, heads, labels)
    low = F.interpolate(labels[:, None].float(), size=(8, 8), mode="nearest-exact")[:, 0].long()
    expected = 2 / 3 * supervised_loss(logits, labels) + 1 / 3 * supervised_loss(heads[1], low)
    torch.testing.assert_close(loss, expected)


def test_alpha_schedules():
    assert [alpha_schedule(k) for k in (1, 2, 4)] == [1.0, 0.5, 0.25]
    assert [alpha_schedule(k, "linear", 4) for k in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]
    for bad in ({"k": 0}, {"k": 1, "kind": "cosine"}, {"k": 2, "kind": "linear"},
                {"k": 5, "kind": "linear", "total": 4}):
        with pytest.raises(ConfigError):
            alpha_schedule(**bad)
