"""Segment -> reconstruct -> pDC/pHD: the QC scoring pass over a site's cases.

For every case and every candidate segmenter, the candidate's prediction is reconstructed by the
frozen QC autoencoder, and the agreement between prediction and reconstruction gives the pseudo
Dice (pDC) and pseudo Hausdorff distance in mm (pHD). This is the hot loop of refinement (every
epoch, every candidate, every case), so networks run batched over slices and the metrics for all
cases run together on the CPU threads (or on the GPU path when the device is CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedqc.config import QCConfig
from fedqc.models.segmenter import main_output
from fedqc.qc.metrics import pseudo_scores_batch
from fedqc.site_data import PreparedCase
from fedqc.train.device import autocast_context as autocast
from fedqc.types import NUM_CLASSES, Label

QC_CLASSES = {"rv": (int(Label.RV),), "foreground": (int(Label.LV), int(Label.MYO), int(Label.RV))}


def qc_classes(cfg: QCConfig) -> tuple[int, ...]:
    return QC_CLASSES[cfg.classes]


def qc_percentile(cfg: QCConfig) -> float | None:
    return 95.0 if cfg.hausdorff == "p95" else None


@torch.no_grad()
def segment(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 32) -> torch.Tensor:
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
    """pDC / pHD of every candidate on every case: arrays of shape (n_cases, m)."""

    case_ids: list[str]
    pdc: np.ndarray
    phd: np.ndarray


def score_cases(models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
                cases: Sequence[PreparedCase], cfg: QCConfig, device: torch.device,
                batch_size: int = 32) -> CaseScores:
    """pDC and pHD (mm) of each candidate model's prediction on each case."""
    pairs = []
    for case in cases:
        for model in models:
            pred = segment(model, case.images, device, batch_size).argmax(1)
            recon = reconstruct(autoencoder, pred, batch_size).argmax(1)
            pairs.append((pred.to(torch.uint8).cpu().numpy(), recon.to(torch.uint8).cpu().numpy(), case.spacing_mm))
    m = len(models)
    if not pairs:
        empty = np.zeros((0, m))
        return CaseScores([], empty, empty.copy())
    pdc, phd = pseudo_scores_batch(pairs, classes=qc_classes(cfg), percentile=qc_percentile(cfg))
    return CaseScores([c.case_id for c in cases], np.asarray(pdc).reshape(len(cases), m),
                      np.asarray(phd).reshape(len(cases), m))


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
