"""Supervised training of a segmenter with Eq. 1, keeping the m_best checkpoints by validation Dice.

:func:`train_one_epoch` is the lean inner loop (also what a federated site runs for "E local epochs from
the given weights"); :func:`train_segmenter` adds validation, learning-rate schedule and top-m keeping.
The loop keeps the whole training set on the device, draws batches and augmentations from a seeded
device generator and synchronises with the host once per epoch (the loss), so it runs as fast as a bare
PyTorch loop of the same model (see ``benchmarks/bench_training.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from fedqc.core.device import (
    autocast_context,
    make_generator,
    seed_everything,
    select_device,
)
from fedqc.core.errors import ConfigError, FedqcError
from fedqc.core.types import Label
from fedqc.models.segmenter import predict_probabilities
from fedqc.train.augment import AugmentConfig, BatchAugmenter
from fedqc.train.checkpoints import Checkpoint, TopKCheckpoints
from fedqc.train.losses import deep_supervised, supervised_loss
from fedqc.train.privacy import PrivateTraining

FOREGROUND: tuple[int, ...] = (Label.LV, Label.MYO, Label.RV)
ArrayOrTensor = np.ndarray | torch.Tensor
ValCase = tuple[ArrayOrTensor, ArrayOrTensor]


@dataclass(frozen=True)
class OptimiserConfig:
    """Optimiser and per-epoch learning-rate schedule.

    Defaults follow the reference's base network 1 (Adam, weight decay 1e-5, lr x0.985 per epoch);
    :func:`nnunet_optimiser` gives nnU-Net's SGD. The initial learning rate is passed separately.

    Attributes:
        kind: ``"adam"`` or ``"sgd"``.
        weight_decay: L2 weight decay.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        schedule: ``"constant"``, ``"exponential"`` (lr * gamma^epoch) or ``"poly"``
            (lr * (1 - epoch/total)^poly_exponent).
        gamma: per-epoch factor of the exponential schedule.
        poly_exponent: exponent of the poly schedule.
    """

    kind: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 1e-5
    momentum: float = 0.99
    nesterov: bool = True
    schedule: Literal["constant", "exponential", "poly"] = "exponential"
    gamma: float = 0.985
    poly_exponent: float = 0.9


def nnunet_optimiser() -> OptimiserConfig:
    """nnU-Net's optimiser: SGD, Nesterov momentum 0.99, weight decay 3e-5, poly decay (use lr 0.01)."""
    return OptimiserConfig(kind="sgd", weight_decay=3e-5, momentum=0.99, nesterov=True, schedule="poly")


def build_optimiser(model: torch.nn.Module, lr: float, config: OptimiserConfig) -> torch.optim.Optimizer:
    """The optimiser over the model's trainable parameters (fused kernels on CUDA).

    Raises:
        ConfigError: unknown optimiser kind.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and params[0].is_cuda
    if config.kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay, fused=fused or None)
    if config.kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay, fused=fused or None)
    raise ConfigError("train.optimiser.kind", f"unknown optimiser '{config.kind}'; use 'adam' or 'sgd'")


def scheduled_lr(initial_lr: float, epoch: int, total_epochs: int, config: OptimiserConfig) -> float:
    """Learning rate of a 0-based ``epoch`` (federated: the global epoch count) of ``total_epochs``."""
    if config.schedule == "constant":
        return initial_lr
    if config.schedule == "exponential":
        return initial_lr * config.gamma**epoch
    if config.schedule == "poly":
        return initial_lr * max(0.0, 1.0 - epoch / max(total_epochs, 1)) ** config.poly_exponent
    raise ConfigError("train.optimiser.schedule", f"unknown schedule '{config.schedule}'")


def set_lr(optimiser: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimiser.param_groups:
        group["lr"] = lr


@dataclass(frozen=True)
class EpochStats:
    """One epoch of local training: mean loss per slice, slices seen (the FedAvg weight), wall time."""

    loss: float
    num_examples: int
    seconds: float


def as_device_tensors(images: ArrayOrTensor, labels: ArrayOrTensor,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a labelled slice set to the device once (no copy when already there).

    Args:
        images: (N, 1, H, W) float images.
        labels: (N, H, W) integer labels (uint8 is kept: 4x less device memory than int64).

    Returns:
        ``(images float32, labels)`` on ``device``.
    """
    images_t = torch.as_tensor(images, dtype=torch.float32, device=device)
    labels_t = torch.as_tensor(labels, device=device)
    if images_t.ndim != 4 or images_t.shape[1] != 1 or labels_t.shape != images_t.shape[:1] + images_t.shape[2:]:
        raise ValueError(f"expected images (N,1,H,W) and labels (N,H,W), got {tuple(images_t.shape)} "
                         f"and {tuple(labels_t.shape)}")
    return images_t, labels_t


def train_one_epoch(model: torch.nn.Module, images: ArrayOrTensor, labels: ArrayOrTensor,
                    optimiser: torch.optim.Optimizer, *, batch_size: int, generator: torch.Generator,
                    augmenter: BatchAugmenter | None = None, grad_clip: float | None = 12.0,
                    autocast: bool = True, channels_last: bool = False,
                    privacy: PrivateTraining | None = None) -> EpochStats:
    """One pass over the labelled slices in random order with the Eq. 1 loss (deep-supervised if any).

    Args:
        model: the segmenter, on its device; left in training mode.
        images: (N, 1, H, W) images (best already on the device, see :func:`as_device_tensors`).
        labels: (N, H, W) labels.
        optimiser: the optimiser (its learning rate is not changed here).
        batch_size: slices per step; the last step takes the remainder.
        generator: seeded generator on the device (batch order and augmentation stream).
        augmenter: batch augmenter on the same device, or None.
        grad_clip: clip the global gradient norm to this (None: no clipping).
        autocast: bf16 autocast on CUDA.
        channels_last: feed channels-last batches (pair with a channels-last model).
        privacy: DP-SGD (:mod:`fedqc.train.privacy`): ``model`` and ``optimiser`` are the ones its
            :meth:`~fedqc.train.privacy.PrivateTraining.wrap` returned; steps draw patients by
            Poisson sampling, the loss is per slice, Opacus clips per patient and adds noise
            (``grad_clip`` is not used).

    Returns:
        The epoch's mean loss, number of examples and seconds.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    images, labels = as_device_tensors(images, labels, device)
    n = images.shape[0]
    model.train()
    if privacy is None:
        order = torch.randperm(n, generator=generator, device=device)
        steps = (order[first:first + batch_size] for first in range(0, n, batch_size))
        loss_fn = supervised_loss
    else:
        steps = privacy.batches(generator)
        loss_fn = partial(supervised_loss, per_sample=True)
    total = torch.zeros((), device=device)
    seen = 0
    for idx in steps:
        optimiser.zero_grad(set_to_none=True)
        if idx.numel() == 0:  # DP: no patient drawn, the step is noise alone
            privacy.per_unit_gradients(model, idx)
            optimiser.step()
            continue
        x, y = images[idx], labels[idx]
        if augmenter is not None:
            x, y = augmenter(x, y)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, autocast):
            output = model(x)
        loss = deep_supervised(loss_fn, output, y)
        loss.backward()
        if privacy is not None:
            privacy.per_unit_gradients(model, idx)
        elif grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimiser.step()
        total += loss.detach() * idx.numel()
        seen += idx.numel()
    mean_loss = total.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise FedqcError(f"training diverged (loss {mean_loss}); lower the learning rate")
    return EpochStats(mean_loss, n, time.perf_counter() - start)


EPOCH_SEED_STRIDE = 7919


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of 0-based ``epoch``: batch order, augmentation and dropout of that epoch.

    Seeding per epoch (not once per run) makes an epoch's randomness independent of how the
    epochs are split into calls: a federated site running epochs 4-7 of a round draws exactly what
    the centralised loop draws for epochs 4-7.
    """
    return seed + EPOCH_SEED_STRIDE * (epoch + 1)


def view_passes(slice_counts: Mapping[str, int]) -> dict[str, int]:
    """Passes over each view's slices per epoch, so that every view gets about as many steps.

    An LA case is one slice against about ten for SA: without this, one epoch gives the LA
    segmenter a tenth of the SA steps, and a short schedule leaves it untrained.
    """
    most = max(slice_counts.values(), default=0)
    return {view: max(1, round(most / n)) if n else 1 for view, n in slice_counts.items()}


def train_epochs(model: torch.nn.Module, images: ArrayOrTensor, labels: ArrayOrTensor,
                 optimiser: torch.optim.Optimizer, *, first_epoch: int, epochs: int, total_epochs: int, lr: float,
                 schedule: OptimiserConfig, batch_size: int, seed: int, augment: bool | AugmentConfig = True,
                 passes: int = 1, grad_clip: float | None = 12.0, autocast: bool = True,
                 channels_last: bool = False,
                 after_epoch: Callable[[int, float, EpochStats], Any] | None = None,
                 privacy: PrivateTraining | None = None) -> EpochStats:
    """Epochs ``first_epoch .. first_epoch + epochs - 1`` (0-based, of ``total_epochs``) of Eq. 1.

    The one supervised loop: ``fedqc train`` runs all epochs in one call, a federated site runs a
    round's local epochs from the global weights (``first_epoch`` = epochs before this round).
    Each epoch sets the scheduled learning rate, seeds its own randomness (:func:`epoch_seed`) and
    makes ``passes`` passes over the slices. ``privacy``: the same epochs with DP-SGD
    (:class:`fedqc.train.privacy.PrivateTraining`; its accountant records every step).

    Returns:
        The last pass's statistics (``num_examples`` counts one pass).
    """
    if privacy is not None:
        trained, dp_optimiser = privacy.wrap(model, optimiser)
        try:
            return _train_epochs(trained, images, labels, dp_optimiser, optimiser, first_epoch=first_epoch,
                                 epochs=epochs, total_epochs=total_epochs, lr=lr, schedule=schedule,
                                 batch_size=batch_size, seed=seed, augment=augment, passes=passes,
                                 grad_clip=None, autocast=autocast, channels_last=channels_last,
                                 after_epoch=after_epoch, privacy=privacy)
        finally:
            privacy.unwrap(trained)
    return _train_epochs(model, images, labels, optimiser, optimiser, first_epoch=first_epoch, epochs=epochs,
                         total_epochs=total_epochs, lr=lr, schedule=schedule, batch_size=batch_size, seed=seed,
                         augment=augment, passes=passes, grad_clip=grad_clip, autocast=autocast,
                         channels_last=channels_last, after_epoch=after_epoch, privacy=None)


def _train_epochs(model, images, labels, optimiser, lr_optimiser, *, first_epoch, epochs, total_epochs, lr, schedule,
                  batch_size, seed, augment, passes, grad_clip, autocast, channels_last, after_epoch,
                  privacy) -> EpochStats:
    device = next(model.parameters()).device
    images, labels = as_device_tensors(images, labels, device)
    aug_config = None
    if augment:
        aug_config = augment if isinstance(augment, AugmentConfig) else AugmentConfig()
    stats = EpochStats(math.nan, 0, 0.0)
    for epoch in range(first_epoch, first_epoch + epochs):
        epoch_lr = scheduled_lr(lr, epoch, total_epochs, schedule)
        set_lr(lr_optimiser, epoch_lr)
        seed_e = epoch_seed(seed, epoch)
        seed_everything(seed_e)
        generator = make_generator(seed_e, device)
        augmenter = BatchAugmenter(aug_config, seed=seed_e + 1, device=device) if aug_config else None
        seconds = 0.0
        for _ in range(passes):
            stats = train_one_epoch(model, images, labels, optimiser, batch_size=batch_size, generator=generator,
                                    augmenter=augmenter, grad_clip=grad_clip, autocast=autocast,
                                    channels_last=channels_last, privacy=privacy)
            seconds += stats.seconds
        stats = EpochStats(stats.loss, stats.num_examples, seconds)
        if after_epoch is not None:
            after_epoch(epoch, epoch_lr, stats)
    return stats


def case_dice(prediction: torch.Tensor, truth: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Dice per class over a whole case (all its slices), NaN where the class is absent from both.

    Args:
        prediction: (Z, H, W) integer labels.
        truth: (Z, H, W) integer labels.
        classes: the classes to score.

    Returns:
        (len(classes),) float tensor.
    """
    scores = []
    for c in classes:
        p, t = prediction == c, truth == c
        denom = p.sum() + t.sum()
        inter = (p & t).sum()
        scores.append(torch.where(denom > 0, 2.0 * inter / denom.clamp(min=1), torch.nan))
    return torch.stack(scores).float()


def validation_score(model: torch.nn.Module, cases: Sequence[ValCase], classes: Sequence[int] = FOREGROUND,
                     batch_size: int = 32, autocast: bool = True) -> float:
    """Mean over cases of the mean Dice over ``classes`` of the argmax prediction (higher is better).

    A class absent from both prediction and ground truth of a case is left out of that case's mean; a
    case with all classes left out scores 1.

    Args:
        model: the segmenter.
        cases: (images (Z, 1, H, W), labels (Z, H, W)) per case (subject and phase).
        classes: classes to average, e.g. (3,) for RV Dice.
        batch_size: slices per forward pass.
        autocast: bf16 autocast on CUDA.

    Returns:
        The score, NaN when there are no cases.
    """
    device = next(model.parameters()).device
    per_case = []
    for images, labels in cases:
        pred = predict_probabilities(model, images, batch_size, device, autocast).argmax(1)
        dice = case_dice(pred, torch.as_tensor(labels, device=device), classes)
        per_case.append(torch.nan_to_num(dice.nanmean(), nan=1.0))
    return torch.stack(per_case).mean().item() if per_case else math.nan


@dataclass
class TrainResult:
    """Outcome of :func:`train_segmenter`.

    Attributes:
        checkpoints: the m_best checkpoints, best first.
        history: one record per epoch (epoch, lr, train_loss, val_score, seconds).
    """

    checkpoints: list[Checkpoint]
    history: list[dict[str, float]] = field(default_factory=list)


def train_segmenter(model: torch.nn.Module, train_images: ArrayOrTensor, train_labels: ArrayOrTensor,
                    val_cases: Sequence[ValCase], *, epochs: int, batch_size: int = 20, lr: float = 5e-4,
                    optimiser: OptimiserConfig | None = None, m_best: int = 3,
                    augment: bool | AugmentConfig = True, device: str | torch.device = "auto", seed: int = 0,
                    progress: Callable[[dict[str, float]], Any] | None = None, grad_clip: float | None = 12.0,
                    score_classes: Sequence[int] = FOREGROUND, checkpoint_dir: str | None = None,
                    autocast: bool = True, channels_last: bool = False, passes: int = 1,
                    privacy: PrivateTraining | None = None) -> TrainResult:
    """Train a segmenter with Eq. 1 and keep the m_best checkpoints by validation Dice.

    Args:
        model: the segmenter; moved to ``device`` and left with the last epoch's weights.
        train_images: (N, 1, H, W) float32 slices.
        train_labels: (N, H, W) uint8 labels.
        val_cases: (images (Z, 1, H, W), labels (Z, H, W)) per validation case. Without any, the score
            is minus the training loss.
        epochs: number of epochs.
        batch_size: slices per step.
        lr: initial learning rate.
        optimiser: optimiser and schedule (default: Adam, x0.985 per epoch).
        m_best: checkpoints to keep.
        augment: True for the default :class:`AugmentConfig`, a config, or False.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a device.
        seed: seeds initialisation-independent randomness (batch order, augmentation).
        progress: called after each epoch with its history record.
        grad_clip: global gradient-norm clip (the reference clips at 12).
        score_classes: classes of the validation Dice, e.g. (3,) for RV only.
        checkpoint_dir: also save kept checkpoints there.
        autocast: bf16 autocast on CUDA.
        channels_last: channels-last memory format (CUDA).
        passes: passes over the slices per epoch (:func:`view_passes`).
        privacy: DP-SGD (:class:`fedqc.train.privacy.PrivateTraining`), see :func:`train_epochs`.

    Returns:
        The ranked checkpoints and the per-epoch history.
    """
    config = optimiser or OptimiserConfig()
    device = select_device(device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    images, labels = as_device_tensors(train_images, train_labels, device)
    opt = build_optimiser(model, lr, config)
    keeper = TopKCheckpoints(m_best, checkpoint_dir)
    history: list[dict[str, float]] = []

    def validate_and_keep(epoch: int, epoch_lr: float, stats: EpochStats) -> None:
        score = (validation_score(model, val_cases, score_classes, batch_size, autocast)
                 if val_cases else -stats.loss)
        keeper.consider(model, epoch + 1, score)
        record = {"epoch": epoch + 1, "lr": epoch_lr, "train_loss": stats.loss, "val_score": score,
                  "seconds": stats.seconds}
        history.append(record)
        if progress is not None:
            progress(record)

    train_epochs(model, images, labels, opt, first_epoch=0, epochs=epochs, total_epochs=epochs, lr=lr,
                 schedule=config, batch_size=batch_size, seed=seed, augment=augment, grad_clip=grad_clip,
                 autocast=autocast, channels_last=channels_last, passes=passes, after_epoch=validate_and_keep,
                 privacy=privacy)
    return TrainResult(keeper.ranked(), history)
