"""Segment -> reconstruct -> pDC/pHD: the QC scoring pass over a site's cases.

For every case and every candidate segmenter, the candidate's prediction is reconstructed by the
frozen QC autoencoder, and the agreement between prediction and reconstruction gives the pseudo
Dice (pDC) and pseudo Hausdorff distance in mm (pHD). This is the hot loop of refinement (every
epoch, every candidate, every case), so networks run batched over slices and the metrics for all
cases run together on the CPU threads, or on the device when it is CUDA (see :func:`score_cases`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedqc.config import QCConfig
from fedqc.core.device import autocast_context as autocast
from fedqc.core.types import NUM_CLASSES, Label
from fedqc.data.site import PreparedCase
from fedqc.models.segmenter import main_output
from fedqc.qc.consistency import stack_consistency, transformed_predictions
from fedqc.qc.metrics import pseudo_scores_batch

QC_CLASSES = {"rv": (int(Label.RV),), "foreground": (int(Label.LV), int(Label.MYO), int(Label.RV))}


def qc_classes(cfg: QCConfig) -> tuple[int, ...]:
    return QC_CLASSES[cfg.classes]


def qc_percentile(cfg: QCConfig) -> float | None:
    return 95.0 if cfg.hausdorff == "p95" else None


@torch.no_grad()
def segment(model: torch.nn.Module, images: np.ndarray | torch.Tensor, device: torch.device,
            batch_size: int = 32) -> torch.Tensor:
    """Softmax probabilities (Z, C, H, W) for a stack of slices (Z, H, W), on ``device``."""
    model.eval()
    x = torch.as_tensor(images, dtype=torch.float32, device=device)[:, None]
    out = []
    for start in range(0, x.shape[0], batch_size):
        with autocast(device):
            logits = main_output(model(x[start:start + batch_size]))
        out.append(torch.softmax(logits.float(), dim=1))
    return torch.cat(out)


@torch.no_grad()
def reconstruct(autoencoder: torch.nn.Module, labels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The QC autoencoder's reconstruction (Z, C, H, W) of a label stack (Z, H, W) given as one-hot."""
    autoencoder.eval()
    onehot = F.one_hot(labels.long(), NUM_CLASSES).permute(0, 3, 1, 2).float()
    out = []
    for start in range(0, onehot.shape[0], batch_size):
        with autocast(onehot.device):
            out.append(autoencoder(onehot[start:start + batch_size]).float())
    return torch.cat(out)


@dataclass
class CaseScores:
    """pDC / pHD of every candidate on every case: arrays of shape (n_cases, m); pTC too when
    ``qc.consistency`` is ``tta`` (:mod:`fedqc.qc.consistency`), else None."""

    case_ids: list[str]
    pdc: np.ndarray
    phd: np.ndarray
    ptc: np.ndarray | None = None


def score_cases(models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
                cases: Sequence[PreparedCase], cfg: QCConfig, device: torch.device,
                batch_size: int = 32) -> CaseScores:
    """pDC and pHD (mm) of each candidate model's prediction on each case.

    All slices of all cases go to the device at once and through each network in batches; only
    uint8 label maps are kept. On CUDA the metrics run there too (:mod:`fedqc.qc.metrics_torch`,
    stacks padded with background slices) and only the scores come back; elsewhere the label maps
    come back once and the metrics use every CPU thread. Single-slice cases (long axis) are scored
    in 2D, in a group of their own.
    """
    m = len(models)
    pdc, phd = np.zeros((len(cases), m)), np.zeros((len(cases), m))
    tta = cfg.consistency == "tta"
    ptc = np.zeros((len(cases), m)) if tta else None
    for planar in (False, True):
        index = [i for i, c in enumerate(cases) if (c.images.shape[0] == 1) == planar]
        if not index:
            continue
        group = [cases[i] for i in index]
        sizes = np.array([c.images.shape[0] for c in group])
        spacing = np.array([c.spacing_mm for c in group], dtype=np.float64)
        x = torch.from_numpy(np.concatenate([c.images for c in group]).astype(np.float32, copy=False)).to(device)
        preds, recons = [], []
        classes, percentile = qc_classes(cfg), qc_percentile(cfg)
        for i, model in enumerate(models):
            def seg(chunk: torch.Tensor, model: torch.nn.Module = model) -> torch.Tensor:
                return segment(model, chunk, device, batch_size)

            pred = _labels(seg, x)
            preds.append(pred)
            recons.append(_labels(lambda chunk: reconstruct(autoencoder, chunk, batch_size), pred))
            if tta:
                others = transformed_predictions(lambda t: _labels(seg, t), x)
                ptc[index, i] = stack_consistency(pred, others, sizes, classes)
        if device.type == "cuda":
            p, h = (t.double().cpu().numpy() for t in scores_on_device(
                torch.stack(preds), torch.stack(recons), sizes, spacing, planar, classes, percentile))
        else:
            p, h = scores_on_host(torch.stack(preds).cpu().numpy(), torch.stack(recons).cpu().numpy(), sizes,
                                  spacing, classes, percentile)
        pdc[index], phd[index] = p.reshape(m, -1).T, h.reshape(m, -1).T
    return CaseScores([c.case_id for c in cases], pdc, phd, ptc)


def _labels(network, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """argmax label maps (uint8) of ``network`` over ``x`` in chunks (never all probabilities at once)."""
    return torch.cat([network(x[i:i + chunk]).argmax(1).to(torch.uint8) for i in range(0, x.shape[0], chunk)])


def scores_on_host(preds: np.ndarray, recons: np.ndarray, sizes: np.ndarray, spacing: np.ndarray,
                   classes: Sequence[int], percentile: float | None) -> tuple[np.ndarray, np.ndarray]:
    """CPU metrics of (m, slices, H, W) label maps (cases of ``sizes`` slices one after the other):
    pDC and pHD per candidate and case, candidate-major."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    pairs = [(preds[k, lo:hi], recons[k, lo:hi], tuple(sp)) for k in range(preds.shape[0])
             for lo, hi, sp in zip(bounds[:-1], bounds[1:], spacing)]
    pdc, phd = pseudo_scores_batch(pairs, classes=classes, percentile=percentile)
    return np.asarray(pdc), np.asarray(phd)


def scores_on_device(preds: torch.Tensor, recons: torch.Tensor, sizes: np.ndarray, spacing: np.ndarray,
                     planar: bool, classes: Sequence[int], percentile: float | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """metrics_torch of (m, slices, H, W) label maps on their device (stacks padded with background
    slices; ``planar``: single slices, scored in 2D): pDC and pHD tensors there, candidate-major."""
    from fedqc.qc.metrics_torch import pseudo_scores_torch

    m, device = preds.shape[0], preds.device
    grid = np.stack([sizes, *[np.full_like(sizes, n) for n in preds.shape[2:]]], 1)
    return pseudo_scores_torch(
        pad_stacks(preds, sizes, planar), pad_stacks(recons, sizes, planar),
        torch.as_tensor(np.tile(spacing, (m, 1)), device=device), classes, percentile,
        shape_zhw=torch.as_tensor(np.tile(grid, (m, 1)), device=device))


def pad_stacks(maps: torch.Tensor, sizes: np.ndarray, planar: bool) -> torch.Tensor:
    """(m, N, H, W) slices of all cases -> (m * cases, Zmax, H, W) stacks padded with background."""
    if planar:
        return maps.flatten(0, 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    z = np.arange(sizes.max())
    index = np.where(z[None] < sizes[:, None], starts[:, None] + z[None], maps.shape[1])
    padded = torch.cat([maps, maps.new_zeros(maps.shape[0], 1, *maps.shape[2:])], dim=1)
    return padded[:, torch.as_tensor(index, device=maps.device)].flatten(0, 1)


def candidate_outputs(models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module, case: PreparedCase,
                      cfg: QCConfig, device: torch.device, batch_size: int = 32
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For one case: candidates' probabilities (m, Z, C, H, W), reconstructions' labels (m, Z, H, W),
    and their pDC (m,) and pHD (m,)."""
    probs, recons, pairs = [], [], []
    for model in models:
        p = segment(model, case.images, device, batch_size)
        pred = p.argmax(1)
        recon = reconstruct(autoencoder, pred, batch_size).argmax(1)
        probs.append(p.cpu().numpy())
        recons.append(recon.to(torch.uint8).cpu().numpy())
        pairs.append((pred.to(torch.uint8).cpu().numpy(), recons[-1], case.spacing_mm))
    pdc, phd = pseudo_scores_batch(pairs, classes=qc_classes(cfg), percentile=qc_percentile(cfg))
    return np.stack(probs), np.stack(recons), np.asarray(pdc), np.asarray(phd)


@torch.no_grad()
def candidate_consistency(models: Sequence[torch.nn.Module], case: PreparedCase, preds: np.ndarray,
                          cfg: QCConfig, device: torch.device, batch_size: int = 32,
                          indices: Sequence[int] | None = None) -> np.ndarray | None:
    """pTC (m,) of each candidate's prediction ``preds[i]`` (Z, H, W) on one case, as
    :func:`score_cases` scores it (only the candidates in ``indices`` when given, NaN for the
    others); None when ``qc.consistency`` is off."""
    if cfg.consistency != "tta":
        return None
    x = torch.as_tensor(np.asarray(case.images, dtype=np.float32), device=device)
    out = np.full(len(models), np.nan)
    for i in range(len(models)) if indices is None else indices:
        model = models[i]
        others = transformed_predictions(lambda t, model=model: segment(model, t, device, batch_size).argmax(1), x)
        out[i] = stack_consistency(torch.as_tensor(np.asarray(preds[i])), others, [x.shape[0]], qc_classes(cfg))[0]
    return out
