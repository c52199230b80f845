"""Loss functions: Eq. 1 (supervised), the QC autoencoder loss, Eq. 2's weighted term, and the alpha schedule.

All losses take float32 inputs (cast before calling when under autocast) and return a scalar tensor.
Generalised Dice follows Sudre et al. (2017) with MONAI's conventions (``GeneralizedDiceLoss`` with
``w_type="square"``): per class ``w_c = 1 / (sum_i r_ic)^2``; a class absent from the reference gets the
largest finite weight of the batch; optional class weights ``lambda_c`` multiply ``w_c``:

    GD(p, r) = 1 - (2 sum_c lambda_c w_c sum_i p_ic r_ic + s) / (sum_c lambda_c w_c sum_i (p_ic + r_ic) + s)

with ``s = 1e-5``, sums over pixels and, with ``batch=True`` (default), over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fedqc.core.errors import ConfigError
from fedqc.core.types import NUM_CLASSES, Label

SMOOTH = 1e-5


def one_hot(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(N, H, W) integer labels -> (N, C, H, W) float32 one-hot maps."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


def class_weights_with_rv(rv_weight: float, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Class weights lambda: 1 for every class, ``rv_weight`` for the RV.

    Args:
        rv_weight: weight of :attr:`Label.RV` (e.g. 2-3 to favour the RV as the challenge ranks it).
        num_classes: number of classes.

    Returns:
        (C,) float32 weights.
    """
    if rv_weight <= 0:
        raise ConfigError("refine.rv_weight", f"must be > 0, got {rv_weight}")
    weights = torch.ones(num_classes)
    weights[Label.RV] = rv_weight
    return weights


def generalized_dice_loss(probs: torch.Tensor, target: torch.Tensor,
                          class_weights: torch.Tensor | None = None, include_background: bool = True,
                          batch: bool = True, smooth: float = SMOOTH) -> torch.Tensor:
    """Generalised Dice loss of Sudre et al. (2017), optionally class weighted (WGD).

    Args:
        probs: (N, C, H, W) predicted probabilities.
        target: (N, C, H, W) reference, one-hot or soft (e.g. an autoencoder reconstruction).
        class_weights: (C,) factors lambda_c multiplying Sudre's 1/volume^2 weights; None = all 1.
        include_background: keep channel 0.
        batch: pool the sums over the batch (one Dice for the batch) instead of averaging per-sample
            losses; pooling keeps classes absent from single slices from dominating.
        smooth: additive constant of numerator and denominator.

    Returns:
        Scalar loss in [0, 1].
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} differ")
    if class_weights is not None:
        class_weights = class_weights.to(device=probs.device, dtype=probs.dtype)
    if not include_background:
        probs, target = probs[:, 1:], target[:, 1:]
        class_weights = None if class_weights is None else class_weights[1:]
    dims = [0, 2, 3] if batch else [2, 3]
    intersection = (probs * target).sum(dims)
    total = (probs + target).sum(dims)
    volume = target.sum(dims)
    weights = torch.reciprocal(volume * volume)
    absent = torch.isinf(weights)
    weights = weights.masked_fill(absent, 0.0)
    largest = weights.amax(dim=-1, keepdim=True)  # per sample, or for the batch
    weights = torch.where(absent, largest, weights)
    if class_weights is not None:
        weights = weights * class_weights
    numer = 2.0 * (weights * intersection).sum(-1) + smooth
    denom = (weights * total).sum(-1) + smooth
    return (1.0 - numer / denom).mean()


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Eq. 1: generalised Dice on the softmax plus cross-entropy, for one (N, C, H, W) output.

    Args:
        logits: (N, C, H, W) logits.
        labels: (N, H, W) integer labels.
        per_sample: the Dice of each slice, averaged (a sum of per-slice terms, as DP-SGD needs)
            instead of one Dice pooled over the batch.

    Returns:
        Scalar loss.
    """
    logits = logits.float()
    labels = labels.long()
    gd = generalized_dice_loss(torch.softmax(logits, dim=1), one_hot(labels, logits.shape[1]), batch=not per_sample)
    return gd + F.cross_entropy(logits, labels)


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's deep-supervision weights: 1/2^i, the coarsest output 0, normalised to sum 1.

    Args:
        num_outputs: number of outputs, full resolution first.

    Returns:
        The weights, e.g. 4 outputs -> [4/7, 2/7, 1/7, 0].
    """
    if num_outputs < 1:
        raise ValueError("need at least one output")
    if num_outputs == 1:
        return [1.0]
    raw = [0.5**i for i in range(num_outputs - 1)] + [0.0]
    return [w / sum(raw) for w in raw]


def deep_supervised(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    output: torch.Tensor | Sequence[torch.Tensor],
                    labels: torch.Tensor) -> torch.Tensor:
    """Apply a loss to every deep-supervision head with :func:`deep_supervision_weights`.

    Heads come from MONAI's DynUNet already upsampled to full resolution (N, S, C, H, W), or as a list of
    (N, C, h, w) tensors, in which case the labels are downsampled (nearest) to each head.
    Zero-weighted heads are skipped.

    Args:
        loss_fn: loss of one (N, C, h, w) output against (N, h, w) labels.
        output: (N, C, H, W) plain logits, (N, S, C, H, W) stacked heads, or a list of heads.
        labels: (N, H, W) integer labels.

    Returns:
        Scalar loss (equal to ``loss_fn(output, labels)`` for a plain output).
    """
    if isinstance(output, torch.Tensor) and output.ndim == 4:
        return loss_fn(output, labels)
    heads = list(output.unbind(1)) if isinstance(output, torch.Tensor) else list(output)
    total = heads[0].new_zeros((), dtype=torch.float32)
    for weight, head in zip(deep_supervision_weights(len(heads)), heads):
        if weight == 0.0:
            continue
        target = labels
        if head.shape[-2:] != labels.shape[-2:]:
            target = F.interpolate(labels[:, None].float(), size=head.shape[-2:], mode="nearest-exact")
            target = target[:, 0].long()
        total = total + weight * loss_fn(head, target)
    return total


def qc_autoencoder_loss(reconstruction: torch.Tensor, labels: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """The QC autoencoder loss L^R = MSE(y^R, y) + GD(y^R, y) against one-hot ground truth.

    Args:
        reconstruction: (N, C, H, W) reconstructed probabilities.
        labels: (N, H, W) integer ground-truth labels.

    Returns:
        Scalar loss.
    """
    reconstruction = reconstruction.float()
    target = one_hot(labels, reconstruction.shape[1])
    return F.mse_loss(reconstruction, target) + generalized_dice_loss(reconstruction, target, batch=not per_sample)


def semi_supervised_term(probs: torch.Tensor, pseudo_target: torch.Tensor,
                         class_weights: torch.Tensor, min_confidence: float = 0.0) -> torch.Tensor:
    """Eq. 2's L_WGD(y^M, y^R): weighted generalised Dice against the detached reconstruction.

    Args:
        probs: (N, C, H, W) segmenter probabilities (carry the gradient).
        pseudo_target: (N, C, H, W) autoencoder reconstruction, used as soft pseudo ground truth.
        class_weights: (C,) factors lambda_c (see :func:`class_weights_with_rv`).
        min_confidence: pixels where R's largest class probability is below this are left out of
            both terms (0: every pixel, the paper's), so Eq. 2 does not pull toward R's uncertain guesses.

    Returns:
        Scalar loss.
    """
    target = pseudo_target.detach().float()
    probs = probs.float()
    if min_confidence > 0:
        keep = (target.amax(1, keepdim=True) >= min_confidence).float()
        probs, target = probs * keep, target * keep
    return generalized_dice_loss(probs, target, class_weights)


def alpha_schedule(k: int, kind: str = "inverse", total: int | None = None) -> float:
    """Weight alpha of the semi-supervised term in refinement epoch ``k`` (1-based).

    Args:
        k: refinement epoch, starting at 1.
        kind: ``"inverse"`` (the paper: alpha = 1/k) or ``"linear"`` (the reference code:
            alpha = 1 - (k - 1)/total, i.e. 1 - e/E with the 0-based epoch e).
        total: number of refinement epochs K_semi; required for ``"linear"``.

    Returns:
        alpha in (0, 1].

    Raises:
        ConfigError: bad epoch, kind or total.
    """
    if k < 1:
        raise ConfigError("refine.epoch", f"epochs are 1-based, got {k}")
    if kind == "inverse":
        return 1.0 / k
    if kind == "linear":
        if total is None or total < k:
            raise ConfigError("refine.epochs", f"linear alpha needs total >= k, got total={total}, k={k}")
        return 1.0 - (k - 1) / total
    raise ConfigError("refine.alpha_schedule", f"unknown schedule '{kind}'; use 'inverse' or 'linear'")
