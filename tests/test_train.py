"""Checkpoint keeping, augmentation, device helpers, supervised and autoencoder training on tiny data."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedqc.core.device import autocast_context, make_generator, select_device
from fedqc.core.errors import ConfigError
from fedqc.models import build_qc_autoencoder, build_segmenter
from fedqc.train.augment import AugmentConfig, BatchAugmenter
from fedqc.train.autoencoder import reconstruct, train_qc_autoencoder
from fedqc.train.checkpoints import TopKCheckpoints, load_checkpoint
from fedqc.train.supervised import (
    OptimiserConfig,
    build_optimiser,
    case_dice,
    nnunet_optimiser,
    scheduled_lr,
    train_one_epoch,
    train_segmenter,
)

CPU = torch.device("cpu")
NO_AUGMENT = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, bias_field_prob=0, gamma_prob=0,
                           scale_intensity_prob=0, shift_prob=0, noise_prob=0)


def synthetic_slices(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Discs (LV), rings (myocardium) and a side blob (RV) with noisy intensities."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cx, cy, r = rng.integers(size // 3, 2 * size // 3, 2).tolist() + [int(rng.integers(3, size // 8 + 3))]
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        labels[i][d2 < (r + 2) ** 2] = 2
        labels[i][d2 < r**2] = 1
        labels[i][(xx - cx - r - 5) ** 2 + (yy - cy) ** 2 < 9] = 3
    images = labels[:, None].astype(np.float32) + rng.normal(0, 0.5, (n, 1, size, size)).astype(np.float32)
    return images, labels


def test_topk_keeps_exactly_the_best(tmp_path):
    model = torch.nn.Linear(2, 1)
    keeper = TopKCheckpoints(k=3, directory=tmp_path)
    scores = [0.1, 0.5, 0.3, 0.9, 0.2, 0.5, math.nan, 0.4]
    for epoch, score in enumerate(scores, start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        keeper.consider(model, epoch, score)
    ranked = keeper.ranked()
    assert [(c.epoch, c.score) for c in ranked] == [(4, 0.9), (2, 0.5), (6, 0.5)]  # tie: earlier first
    assert [c.state_dict["weight"][0, 0].item() for c in ranked] == [4, 2, 6]  # copies, not the live model
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"segmenter-epoch{e:04d}.pt" for e in (2, 4, 6)]
    loaded = load_checkpoint(ranked[0].path)
    assert loaded.epoch == 4 and torch.equal(loaded.state_dict["weight"], ranked[0].state_dict["weight"])


def test_augmenter_is_deterministic_and_keeps_labels_valid():
    images, labels = (torch.as_tensor(a) for a in synthetic_slices(6))
    out1 = BatchAugmenter(seed=3)(images, labels)
    out2 = BatchAugmenter(seed=3)(images, labels)
    out3 = BatchAugmenter(seed=4)(images, labels)
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    assert not torch.equal(out1[0], out3[0])
    assert out1[1].dtype == torch.int64 and set(out1[1].unique().tolist()) <= {0, 1, 2, 3}


def test_augmenter_identity_flip_and_zoom():
    images, labels = (torch.as_tensor(a) for a in synthetic_slices(4))
    same = BatchAugmenter(NO_AUGMENT)(images, labels)
    torch.testing.assert_close(same[0], images)
    assert torch.equal(same[1], labels.long())
    flipped = BatchAugmenter(replace(NO_AUGMENT, flip_prob=1.0))(images, labels)
    torch.testing.assert_close(flipped[0], images.flip(-2, -1))
    zoom = replace(NO_AUGMENT, scale_prob=1.0, scale_range=(1.4, 1.4))
    zoomed = BatchAugmenter(zoom)(images, labels)[1]
    assert (zoomed > 0).sum() > 1.5 * (labels > 0).sum()  # area grows by ~1.96


def test_device_helpers():
    assert select_device("cpu") == CPU
    assert select_device("auto").type in ("cpu", "cuda")
    assert not isinstance(autocast_context(CPU), torch.autocast)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            select_device("cuda")


def test_optimisers_and_schedules():
    model = torch.nn.Linear(2, 1)
    sgd = build_optimiser(model, 0.01, nnunet_optimiser())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    assert isinstance(build_optimiser(model, 1e-3, OptimiserConfig()), torch.optim.Adam)
    assert scheduled_lr(0.01, 0, 100, nnunet_optimiser()) == 0.01
    assert scheduled_lr(0.01, 50, 100, nnunet_optimiser()) == pytest.approx(0.01 * 0.5**0.9)
    assert scheduled_lr(1.0, 2, 100, OptimiserConfig()) == pytest.approx(0.985**2)
    with pytest.raises(ConfigError):
        build_optimiser(model, 1e-3, OptimiserConfig(kind="lamb"))


def test_case_dice_known_answers():
    truth = torch.zeros(2, 8, 8, dtype=torch.long)
    truth[:, 2:6, 2:6] = 1
    pred = truth.clone()
    pred[:, 2:6, 2:4] = 0  # half the LV found: Dice = 2 * 16 / (16 + 32)
    dice = case_dice(pred, truth, (1, 3))
    assert dice[0].item() == pytest.approx(2 / 3) and math.isnan(dice[1].item())


def test_train_one_epoch_reports_examples_and_updates_weights():
    images, labels = synthetic_slices(10)
    model = build_segmenter("tiny", 32)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, images, labels, build_optimiser(model, 1e-3, OptimiserConfig()),
                            batch_size=4, generator=make_generator(0, CPU), augmenter=BatchAugmenter())
    assert stats.num_examples == 10 and math.isfinite(stats.loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("preset, kwargs", [("tiny", None), ("dynunet", {"filters": [4, 8, 16, 32]})])
def test_train_segmenter_returns_ranked_top_m(preset, kwargs):
    images, labels = synthetic_slices(16)
    val_cases = [(images[:4], labels[:4]), (images[4:8], labels[4:8])]
    seen = []
    result = train_segmenter(build_segmenter(preset, 32, kwargs=kwargs), images, labels, val_cases, epochs=4,
                             batch_size=8, m_best=3, device="cpu", progress=seen.append)
    scores = [c.score for c in result.checkpoints]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert len(result.history) == len(seen) == 4
    assert max(r["val_score"] for r in result.history) == scores[0]
    assert result.history[1]["lr"] < result.history[0]["lr"]


def test_train_segmenter_is_reproducible_and_works_without_validation():
    images, labels = synthetic_slices(8)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_segmenter("tiny", 32)
        result = train_segmenter(model, images, labels, [], epochs=1, batch_size=4, device="cpu", seed=7)
        runs.append(result)
    assert runs[0].history[0]["val_score"] == -runs[0].history[0]["train_loss"]
    for a, b in zip(runs[0].checkpoints[0].state_dict.values(), runs[1].checkpoints[0].state_dict.values()):
        assert torch.equal(a, b)


def test_train_qc_autoencoder_and_reconstruct():
    _, labels = synthetic_slices(12)
    ae = build_qc_autoencoder(32)
    result = train_qc_autoencoder(ae, labels[:8], epochs=2, batch_size=4, val_labels=labels[8:], device="cpu")
    assert len(result.history) == 2 and result.best is not None
    assert result.best.score == max(-r["val_loss"] for r in result.history)
    from_labels = reconstruct(ae, labels[8:], batch_size=3)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(labels[8:]).long(), 4).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(from_labels, reconstruct(ae, onehot))
    assert from_labels.shape == (4, 4, 32, 32)
