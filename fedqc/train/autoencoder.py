"""Training of the QC autoencoder R on ground-truth masks (L^R = MSE + generalised Dice), and reconstruction.

Like the reference, the autoencoder sees ground-truth masks only and no augmentation: flips or large
rotations would teach it to accept anatomically implausible layouts (an RV on the wrong side), which is
exactly what it must flag.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedqc.core.device import (
    autocast_context,
    eval_mode,
    make_generator,
    seed_everything,
    select_device,
)
from fedqc.core.errors import FedqcError
from fedqc.core.types import NUM_CLASSES
from fedqc.train.augment import AugmentConfig, BatchAugmenter
from fedqc.train.checkpoints import Checkpoint, TopKCheckpoints
from fedqc.train.corrupt import CorruptionConfig, corrupt_masks
from fedqc.train.losses import one_hot, qc_autoencoder_loss
from fedqc.train.privacy import PrivateTraining
from fedqc.train.supervised import EpochStats, epoch_seed

ArrayOrTensor = np.ndarray | torch.Tensor


# The appearance shift under which the segmenter's own predictions of labelled training slices are
# made (segmenter_examples): stronger than training augmentation, so that the predictions fail the way
# they do at a shifted scanner (contrast, bias field, noise), not only the way corrupt_masks draws.
SHIFT = AugmentConfig(flip_prob=0.0, rotate_prob=0.3, rotate_deg=15.0, scale_prob=0.3, scale_range=(0.8, 1.25),
                      bias_field_prob=0.7, bias_field_coeff=0.5, gamma_prob=0.8, gamma_range=(0.35, 2.8),
                      scale_intensity_prob=0.5, scale_intensity=0.5, shift_prob=0.5, shift=0.5,
                      noise_prob=0.5, noise_std_max=0.35)

# (inputs, targets): (K, H, W) integer masks R is given and the clean masks it must output.
Examples = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def segmenter_examples(models: Sequence[torch.nn.Module], images: ArrayOrTensor, labels: ArrayOrTensor, *,
                       seed: int, shift: AugmentConfig = SHIFT, batch_size: int = 64) -> Examples:
    """The segmenters' own predictions of labelled slices under an appearance shift, with the truth.

    Each slice is shifted once (:data:`SHIFT`, seeded by ``seed``) and predicted by one of
    ``models`` (drawn per slice), so the examples cost one forward pass per slice. The corrective QC
    module learns from them to map what *these* segmenters get wrong onto the clean mask, beside the
    synthetic failures of :func:`fedqc.train.corrupt.corrupt_masks`.

    Args:
        models: the candidate segmenters (their modes are restored afterwards).
        images: (N, H, W) or (N, 1, H, W) float slices.
        labels: (N, H, W) integer ground truth.
        seed: seed of the shift and of the model drawn per slice.

    Returns:
        ``(predictions, truth)``, both (N, H, W) int64 on the models' device.
    """
    device = next(models[0].parameters()).device
    images = torch.as_tensor(images, device=device).float()
    images = images[:, None] if images.ndim == 3 else images
    labels = torch.as_tensor(labels, device=device).long()
    augmenter = BatchAugmenter(shift, seed=seed, device=device)
    generator = make_generator(seed + 1, device)
    which = torch.randint(len(models), (labels.shape[0],), generator=generator, device=device)
    inputs, targets = [], []
    for first in range(0, labels.shape[0], batch_size):
        x, y = augmenter(images[first:first + batch_size], labels[first:first + batch_size])
        pick = which[first:first + batch_size]
        prediction = torch.zeros_like(y)
        for i, model in enumerate(models):
            chosen = pick == i
            if bool(chosen.any()):
                with eval_mode(model):
                    prediction[chosen] = model(x[chosen]).argmax(1)
        inputs.append(prediction)
        targets.append(y)
    empty = torch.empty((0, *labels.shape[1:]), dtype=torch.long, device=device)
    return (torch.cat(inputs) if inputs else empty), (torch.cat(targets) if targets else empty)


def autoencoder_one_epoch(ae: torch.nn.Module, labels: ArrayOrTensor, optimiser: torch.optim.Optimizer, *,
                          batch_size: int, generator: torch.Generator, autocast: bool = True,
                          corruption: CorruptionConfig | None = None,
                          examples: Examples | None = None,
                          privacy: PrivateTraining | None = None) -> EpochStats:
    """One pass over ground-truth label slices in random order.

    Args:
        ae: the autoencoder, on its device; left in training mode.
        labels: (N, H, W) integer masks (best already on the device).
        optimiser: its optimiser.
        batch_size: masks per step.
        generator: seeded generator on the device (batch order).
        autocast: bf16 autocast on CUDA.
        corruption: corrupt the masks R is given (the corrective module); None: R reproduces them.
        examples: extra ``(input, target)`` pairs (:func:`segmenter_examples`), shuffled in with
            the masks and given to R as they are (one per mask, in the masks' order).
        privacy: DP-SGD, as in :func:`fedqc.train.supervised.train_one_epoch` (``ae`` and
            ``optimiser`` wrapped by :meth:`~fedqc.train.privacy.PrivateTraining.wrap`); a
            segmenter example belongs to the patient of the mask it was made from.

    Returns:
        Mean loss, number of masks, seconds.
    """
    start = time.perf_counter()
    device = next(ae.parameters()).device
    labels = torch.as_tensor(labels, device=device).long()
    n_masks = labels.shape[0]
    inputs = labels
    if examples is not None and examples[0].shape[0]:
        inputs = torch.cat([labels, examples[0].to(device).long()])
        labels = torch.cat([labels, examples[1].to(device).long()])
    n = labels.shape[0]
    ae.train()
    if privacy is None:
        order = torch.randperm(n, generator=generator, device=device)
        steps = (order[first:first + batch_size] for first in range(0, n, batch_size))
    else:
        row_units = privacy.row_units(n)
        steps = privacy.batches(generator, row_units)
    total = torch.zeros((), device=device)
    seen = 0
    for index in steps:
        optimiser.zero_grad(set_to_none=True)
        if index.numel() == 0:  # DP: no patient drawn, the step is noise alone
            privacy.per_unit_gradients(ae, index, row_units)
            optimiser.step()
            continue
        y = labels[index]
        x = corrupt_masks(y, generator, corruption) if corruption is not None else y
        if n > n_masks:  # segmenter examples go in as they are
            given = (index >= n_masks)[:, None, None]
            x = torch.where(given, inputs[index], x)
        with autocast_context(device, autocast):
            reconstruction = ae(one_hot(x, NUM_CLASSES))
        loss = qc_autoencoder_loss(reconstruction, y, per_sample=privacy is not None)
        loss.backward()
        if privacy is not None:
            privacy.per_unit_gradients(ae, index, row_units)
        optimiser.step()
        total += loss.detach() * y.shape[0]
        seen += y.shape[0]
    mean_loss = total.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise FedqcError(f"QC autoencoder training diverged (loss {mean_loss}); lower the learning rate")
    return EpochStats(mean_loss, n, time.perf_counter() - start)


def autoencoder_optimiser(ae: torch.nn.Module, lr: float, weight_decay: float = 1e-5) -> torch.optim.Optimizer:
    """Adam, as the reference (lr 2e-4, weight decay 1e-5)."""
    return torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=weight_decay)


def autoencoder_epochs(ae: torch.nn.Module, labels: ArrayOrTensor, optimiser: torch.optim.Optimizer, *,
                       first_epoch: int, epochs: int, batch_size: int, seed: int, passes: int = 1,
                       autocast: bool = True, corruption: CorruptionConfig | None = None,
                       examples: Callable[[int], Examples] | None = None,
                       after_epoch: Callable[[int, EpochStats], Any] | None = None,
                       privacy: PrivateTraining | None = None) -> EpochStats:
    """Epochs ``first_epoch ..`` of L^R: the one autoencoder loop (``fedqc train`` and a federated site).

    Each epoch seeds its own batch order (:func:`fedqc.train.supervised.epoch_seed`), so splitting
    the epochs into rounds draws the same batches. ``examples(seed)``: the epoch's segmenter
    examples, drawn anew each epoch from the epoch's seed (the same split into rounds or not).
    ``privacy``: the same epochs with DP-SGD (:class:`fedqc.train.privacy.PrivateTraining`).
    """
    if privacy is None:
        return _autoencoder_epochs(ae, labels, optimiser, first_epoch=first_epoch, epochs=epochs,
                                   batch_size=batch_size, seed=seed, passes=passes, autocast=autocast,
                                   corruption=corruption, examples=examples, after_epoch=after_epoch, privacy=None)
    trained, dp_optimiser = privacy.wrap(ae, optimiser)
    try:
        return _autoencoder_epochs(trained, labels, dp_optimiser, first_epoch=first_epoch, epochs=epochs,
                                   batch_size=batch_size, seed=seed, passes=passes, autocast=autocast,
                                   corruption=corruption, examples=examples, after_epoch=after_epoch,
                                   privacy=privacy)
    finally:
        privacy.unwrap(trained)


def _autoencoder_epochs(ae, labels, optimiser, *, first_epoch, epochs, batch_size, seed, passes, autocast,
                        corruption, examples, after_epoch, privacy) -> EpochStats:
    device = next(ae.parameters()).device
    labels = torch.as_tensor(labels, device=device)
    stats = EpochStats(math.nan, 0, 0.0)
    for epoch in range(first_epoch, first_epoch + epochs):
        seed_e = epoch_seed(seed, epoch)
        seed_everything(seed_e)
        generator = make_generator(seed_e, device)
        seconds = 0.0
        pairs = examples(seed_e) if examples is not None else None
        for _ in range(passes):
            stats = autoencoder_one_epoch(ae, labels, optimiser, batch_size=batch_size, generator=generator,
                                          autocast=autocast, corruption=corruption, examples=pairs,
                                          privacy=privacy)
            seconds += stats.seconds
        stats = EpochStats(stats.loss, stats.num_examples, seconds)
        if after_epoch is not None:
            after_epoch(epoch, stats)
    return stats


@torch.no_grad()
def reconstruct(ae: torch.nn.Module, masks: ArrayOrTensor, batch_size: int = 64,
                device: torch.device | None = None, autocast: bool = True) -> torch.Tensor:
    """Reconstruct masks in eval mode, batch by batch.

    Args:
        ae: the autoencoder (its mode is restored afterwards).
        masks: (Z, H, W) integer labels (one-hot encoded here) or (Z, 4, H, W) probabilities.
        batch_size: masks per forward pass.
        device: where to compute; defaults to the autoencoder's device.
        autocast: bf16 autocast on CUDA.

    Returns:
        (Z, 4, H, W) float32 reconstructed probabilities on ``device``.
    """
    device = device or next(ae.parameters()).device
    masks = torch.as_tensor(masks)
    chunks = []
    with eval_mode(ae):
        for first in range(0, masks.shape[0], batch_size):
            batch = masks[first:first + batch_size].to(device, non_blocking=True)
            batch = one_hot(batch, NUM_CLASSES) if batch.ndim == 3 else batch.float()
            with autocast_context(device, autocast):
                chunks.append(ae(batch).float())
    if not chunks:
        return torch.empty((0, NUM_CLASSES, *masks.shape[-2:]), device=device)
    return torch.cat(chunks)


def autoencoder_validation_loss(ae: torch.nn.Module, labels: ArrayOrTensor, batch_size: int = 64) -> float:
    """Mean L^R over validation masks, in eval mode.

    Args:
        ae: the autoencoder.
        labels: (N, H, W) integer masks.
        batch_size: masks per forward pass.

    Returns:
        The mean loss per mask.
    """
    device = next(ae.parameters()).device
    labels = torch.as_tensor(labels, device=device)
    total = torch.zeros((), device=device)
    for first in range(0, labels.shape[0], batch_size):
        y = labels[first:first + batch_size].long()
        total += qc_autoencoder_loss(reconstruct(ae, y, batch_size, device), y) * y.shape[0]
    return total.item() / max(labels.shape[0], 1)


@dataclass
class AutoencoderResult:
    """Outcome of :func:`train_qc_autoencoder`.

    Attributes:
        best: the checkpoint with the lowest validation loss (score = -loss), None without validation.
        history: one record per epoch (epoch, train_loss, val_loss, seconds).
    """

    best: Checkpoint | None
    history: list[dict[str, float]] = field(default_factory=list)


def train_qc_autoencoder(ae: torch.nn.Module, label_slices: ArrayOrTensor, *, epochs: int,
                         batch_size: int = 32, lr: float = 2e-4, weight_decay: float = 1e-5,
                         val_labels: ArrayOrTensor | None = None, restore_best: bool = True,
                         device: str | torch.device = "auto", seed: int = 0,
                         progress: Callable[[dict[str, float]], Any] | None = None,
                         autocast: bool = True, passes: int = 1,
                         corruption: CorruptionConfig | None = None,
                         examples: Callable[[int], Examples] | None = None,
                         privacy: PrivateTraining | None = None) -> AutoencoderResult:
    """Train the QC autoencoder with Adam on ground-truth masks.

    Args:
        ae: the autoencoder; moved to ``device``.
        label_slices: (N, H, W) uint8 ground-truth masks.
        epochs: number of epochs (the reference ran 500).
        batch_size: masks per step.
        lr: Adam learning rate (reference 2e-4).
        weight_decay: Adam weight decay (reference 1e-5).
        val_labels: (M, H, W) masks to select the best epoch on; None keeps the last epoch.
        restore_best: load the best validation epoch's weights into ``ae`` at the end.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a device.
        seed: seed of the batch order.
        progress: called after each epoch with its history record.
        autocast: bf16 autocast on CUDA.

    Returns:
        The best checkpoint and the history.
    """
    device = select_device(device)
    ae.to(device)
    labels = torch.as_tensor(label_slices, device=device)
    optimiser = autoencoder_optimiser(ae, lr, weight_decay)
    keeper = TopKCheckpoints(1, prefix="qc-autoencoder-")
    history: list[dict[str, float]] = []

    def validate_and_keep(epoch: int, stats: EpochStats) -> None:
        record = {"epoch": epoch + 1, "train_loss": stats.loss, "seconds": stats.seconds}
        if val_labels is not None:
            record["val_loss"] = autoencoder_validation_loss(ae, val_labels, batch_size)
            keeper.consider(ae, epoch + 1, -record["val_loss"])
        history.append(record)
        if progress is not None:
            progress(record)

    autoencoder_epochs(ae, labels, optimiser, first_epoch=0, epochs=epochs, batch_size=batch_size, seed=seed,
                       passes=passes, autocast=autocast, corruption=corruption, examples=examples,
                       after_epoch=validate_and_keep, privacy=privacy)
    best = keeper.ranked()[0] if len(keeper) else None
    if best is not None and restore_best:
        ae.load_state_dict(best.state_dict)
    return AutoencoderResult(best, history)
