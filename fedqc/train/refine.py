"""Semi-supervised refinement of a segmenter on OoD-flagged cases (Eq. 2), one epoch at a time.

    L = alpha * L_WGD(y^M, y^R) + L_SUP(y^M_labelled, y_labelled)

Each optimiser step takes a batch of flagged slices and a batch of labelled slices through the segmenter in
one forward pass. For the flagged half the frozen QC autoencoder reconstructs the prediction (no gradient)
and the reconstruction serves as soft pseudo ground truth. The autoencoder is fed the one-hot argmax of the
prediction by default: that is the distribution it was trained on (ground-truth masks) and the input
on which QC flagged the case, so the pseudo ground truth is the very reconstruction QC judged
(``ae_input="softmax"`` feeds the probabilities, as the reference did).

Differences from the reference, on purpose: slices of all flagged cases are pooled and shuffled, and every
slice's pseudo ground truth comes from its own prediction in the same step, so cases longer than a batch
(or single-slice LA cases) are handled alike; the optimiser (and its learning rate) is owned by the
caller and persists across refinement epochs, so nothing restarts; supervised and semi-supervised terms
share every step instead of alternating passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedqc.core.device import autocast_context, eval_mode
from fedqc.core.errors import ConfigError
from fedqc.core.types import NUM_CLASSES
from fedqc.models.segmenter import main_output, predict_probabilities
from fedqc.train.augment import BatchAugmenter
from fedqc.train.losses import (
    class_weights_with_rv,
    deep_supervised,
    one_hot,
    semi_supervised_term,
    supervised_loss,
)
from fedqc.train.supervised import as_device_tensors

ArrayOrTensor = np.ndarray | torch.Tensor
AE_INPUTS = ("onehot", "softmax")


@torch.no_grad()
def pseudo_ground_truth(autoencoder: torch.nn.Module, probs: torch.Tensor, ae_input: str = "onehot",
                        autocast: bool = True) -> torch.Tensor:
    """The autoencoder's reconstruction of a prediction, without gradient.

    Args:
        autoencoder: the QC autoencoder (expected in eval mode).
        probs: (N, 4, H, W) segmenter probabilities.
        ae_input: ``"onehot"`` (argmax, one-hot encoded) or ``"softmax"`` (the probabilities).
        autocast: bf16 autocast on CUDA.

    Returns:
        (N, 4, H, W) float32 reconstruction.
    """
    if ae_input not in AE_INPUTS:
        raise ConfigError("refine.ae_input", f"unknown '{ae_input}'; use one of {list(AE_INPUTS)}")
    masks = one_hot(probs.argmax(1), NUM_CLASSES) if ae_input == "onehot" else probs.detach().float()
    with autocast_context(probs.device, autocast):
        return autoencoder(masks).float()


def _stack_cases(cases: Sequence[ArrayOrTensor], device: torch.device) -> torch.Tensor:
    stacks = [torch.as_tensor(c, dtype=torch.float32, device=device) for c in cases if len(c)]
    if not stacks:
        return torch.empty(0, device=device)
    if any(s.ndim != 4 or s.shape[1] != 1 for s in stacks):
        raise ValueError("flagged cases must be (Z, 1, H, W) image stacks")
    return torch.cat(stacks)


def _cycled_order(n: int, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``count`` indices into ``n`` items: shuffled passes, reshuffled each pass."""
    passes = math.ceil(count / n)
    return torch.cat([torch.randperm(n, generator=generator, device=device) for _ in range(passes)])[:count]


def refine_epoch(model: torch.nn.Module, autoencoder: torch.nn.Module, flagged_cases: Sequence[ArrayOrTensor],
                 labelled_images: ArrayOrTensor | None, labelled_labels: ArrayOrTensor | None, *, alpha: float,
                 batch_size: int, optimiser: torch.optim.Optimizer, generator: torch.Generator,
                 rv_weight: float = 2.5, class_weights: torch.Tensor | None = None, ae_input: str = "onehot",
                 augmenter: BatchAugmenter | None = None, grad_clip: float | None = 12.0,
                 autocast: bool = True, min_confidence: float = 0.0) -> dict[str, float]:
    """One refinement epoch: every flagged slice once, each step paired with a labelled batch.

    Steps = ceil(flagged slices / batch_size). The labelled batches are drawn in shuffled passes over the
    labelled slices (cycling when there are fewer than needed); with no labelled data the step uses the
    semi-supervised term alone. Augmentation, when given, applies to labelled slices only.

    Args:
        model: the segmenter, on its device; left in training mode.
        autoencoder: the frozen QC autoencoder on the same device (run in eval mode, never updated).
        flagged_cases: (Z, 1, H, W) image stacks of the OoD-flagged cases.
        labelled_images: (N, 1, H, W) labelled images of the site, or None.
        labelled_labels: (N, H, W) their labels, or None.
        alpha: weight of the semi-supervised term (see :func:`fedqc.train.losses.alpha_schedule`).
        batch_size: flagged slices per step, and labelled slices per step.
        optimiser: the caller's optimiser; its learning rate is left alone.
        generator: seeded generator on the device (slice order).
        rv_weight: class weight lambda of the RV in L_WGD (others 1); ignored if ``class_weights``.
        class_weights: (4,) explicit class weights lambda.
        ae_input: what the autoencoder is fed: ``"onehot"`` or ``"softmax"``.
        augmenter: augmenter for the labelled batches, or None.
        grad_clip: global gradient-norm clip (None: none).
        autocast: bf16 autocast on CUDA.
        min_confidence: pseudo-label pixels below this confidence of R are left out
            (:func:`fedqc.train.losses.semi_supervised_term`).

    Returns:
        ``semi_loss`` and ``sup_loss`` (means over steps; sup 0 without labelled data), ``n_flagged_slices``,
        ``n_labelled`` (labelled slices used), ``steps``, ``alpha``.
    """
    device = next(model.parameters()).device
    weights = class_weights if class_weights is not None else class_weights_with_rv(rv_weight)
    weights = weights.to(device)
    flagged = _stack_cases(flagged_cases, device)
    n_flagged = flagged.shape[0]
    has_labelled = labelled_images is not None and labelled_labels is not None and len(labelled_images) > 0
    if has_labelled:
        images_l, labels_l = as_device_tensors(labelled_images, labelled_labels, device)
    # Without a flagged slice the epoch is Eq. 2's supervised term alone, one pass over the labelled
    # slices (a labelled site in a federated refine round whose own pool flags nothing).
    if n_flagged:
        steps = math.ceil(n_flagged / batch_size)
    else:
        steps = math.ceil(images_l.shape[0] / batch_size) if has_labelled else 0
    result = {"semi_loss": 0.0, "sup_loss": 0.0, "n_flagged_slices": n_flagged, "n_labelled": 0,
              "steps": steps, "alpha": alpha}
    if steps == 0:
        return result
    order_f = torch.randperm(n_flagged, generator=generator, device=device)
    if has_labelled:
        order_l = _cycled_order(images_l.shape[0], steps * batch_size, generator, device)
    model.train()
    semi_total = torch.zeros((), device=device)
    sup_total = torch.zeros((), device=device)
    with eval_mode(autoencoder):
        for step in range(steps):
            parts = []
            nf = 0
            if n_flagged:
                parts.append(flagged[order_f[step * batch_size:(step + 1) * batch_size]])
                nf = parts[0].shape[0]
            if has_labelled:
                idx = order_l[step * batch_size:(step + 1) * batch_size]
                x_l, y_l = images_l[idx], labels_l[idx]
                if augmenter is not None:
                    x_l, y_l = augmenter(x_l, y_l)
                parts.append(x_l)
            x = torch.cat(parts) if len(parts) > 1 else parts[0]
            with autocast_context(device, autocast):
                output = model(x)
            loss = torch.zeros((), device=device)
            if nf:
                probs = torch.softmax(main_output(output)[:nf].float(), dim=1)
                target = pseudo_ground_truth(autoencoder, probs, ae_input, autocast)
                semi = semi_supervised_term(probs, target, weights, min_confidence)
                loss = alpha * semi
                semi_total += semi.detach()
            if has_labelled:
                sup = deep_supervised(supervised_loss, output[nf:] if nf else output, y_l)
                loss = loss + sup
                sup_total += sup.detach()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimiser.step()
    result["semi_loss"] = semi_total.item() / steps
    result["sup_loss"] = sup_total.item() / steps
    result["n_labelled"] = min(steps * batch_size, images_l.shape[0]) if has_labelled else 0
    return result


@torch.no_grad()
def semi_supervised_loss_on_cases(model: torch.nn.Module, autoencoder: torch.nn.Module,
                                  cases: Sequence[ArrayOrTensor], *, rv_weight: float = 2.5,
                                  ae_input: str = "onehot", batch_size: int = 32,
                                  autocast: bool = True) -> float:
    """Mean over cases of L_WGD(y^M, y^R) in eval mode: how far predictions are from their reconstructions.

    Args:
        model: the segmenter.
        autoencoder: the QC autoencoder.
        cases: (Z, 1, H, W) image stacks.
        rv_weight: RV class weight.
        ae_input: ``"onehot"`` or ``"softmax"``.
        batch_size: slices per forward pass.
        autocast: bf16 autocast on CUDA.

    Returns:
        The mean loss (NaN without cases).
    """
    device = next(model.parameters()).device
    weights = class_weights_with_rv(rv_weight).to(device)
    losses = []
    with eval_mode(autoencoder):
        for case in (c for c in cases if len(c)):
            probs = predict_probabilities(model, case, batch_size, device, autocast)
            target = torch.cat([pseudo_ground_truth(autoencoder, probs[i:i + batch_size], ae_input, autocast)
                                for i in range(0, probs.shape[0], batch_size)])
            losses.append(semi_supervised_term(probs, target, weights).item())
    return float(np.mean(losses)) if losses else math.nan
