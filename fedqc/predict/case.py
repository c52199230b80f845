"""QC-based candidate selection on one case (Sec. 2.3, steps 1-5), in the network grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedqc.config import Config
from fedqc.data.site import PreparedCase
from fedqc.qc.ood import candidate_passes, flag_ood
from fedqc.qc.scoring import candidate_consistency, candidate_outputs
from fedqc.qc.scoring import reconstruct as reconstruct_labels
from fedqc.qc.selection import apply_selection, select_candidate
from fedqc.qc.thresholds import Thresholds


@dataclass
class CasePrediction:
    """QC-based selection's outcome for one case, in the network grid."""

    probs: np.ndarray  # (Z, C, H, W) selected (or fallback-averaged) probabilities
    labels: np.ndarray  # (Z, H, W)
    reconstruction: np.ndarray  # (Z, H, W) reconstruction of the selected candidate (or of the best-pDC one)
    pdc: np.ndarray  # (m,)
    phd: np.ndarray  # (m,)
    ood: bool
    selected: int | None  # candidate index, None for the fallback average
    pdc_selected: float
    phd_selected: float
    # The output is R's reconstruction of the selection (the site's qc.reconstruction_floor decision).
    reconstructed: bool = False
    ptc: np.ndarray | None = None  # (m,) with qc.consistency: tta; NaN where it decided nothing
    ptc_selected: float | None = None  # the output's pTC (the reference candidate's in a fallback)


def predict_case(config: Config, models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
                 case: PreparedCase, thresholds: Thresholds, device: torch.device,
                 selection: bool = True, reconstruct: bool = False) -> CasePrediction:
    """Sec. 2.3 steps 1-5 on one case (``selection=False``: the first candidate, i.e. M).

    ``reconstruct`` (with selection on; the site's decision, :func:`site_reconstructs`): the output
    is R's reconstruction of the selection (R's softmax, as Post-DAE outputs it).
    """
    probs, recons, pdc, phd = candidate_outputs(models, autoencoder, case, config.qc, device)
    preds = probs.argmax(2)
    ptc = deciding_consistency(config, models, case, preds, pdc, phd, thresholds, device)
    ood = bool(flag_ood(pdc[None], phd[None], thresholds, None if ptc is None else ptc[None])[0])
    if selection:
        margin = None if config.qc.selection == "paper" else config.qc.selection_margin
        choice = select_candidate(pdc, phd, thresholds.th_up_phd, thresholds.th_low_pdc, margin,
                                  m_must_pass=config.qc.selection == "guarded")
        chosen = apply_selection(choice, probs)
        index = choice.index
    else:
        chosen, index = probs[0], 0
    ref = index if index is not None else int(np.argmax(pdc))
    if index is None:
        i, j = choice.fallback_pair
        pdc_sel, phd_sel = float(max(pdc[i], pdc[j])), float(min(phd[i], phd[j]))
    else:
        pdc_sel, phd_sel = float(pdc[index]), float(phd[index])
    if ptc is not None and np.isnan(ptc[ref]):  # the output's own pTC, for qc.csv and the report
        ptc[ref] = candidate_consistency(models, case, preds, config.qc, device, indices=[ref])[ref]
    reconstructed = selection and reconstruct
    if reconstructed:  # Post-DAE on this case: R's softmax of the selection's labels
        chosen = reconstruct_labels(autoencoder, torch.as_tensor(chosen.argmax(1), device=device)).cpu().numpy()
    return CasePrediction(probs=chosen, labels=chosen.argmax(1).astype(np.uint8), reconstruction=recons[ref],
                          pdc=pdc, phd=phd, ood=ood, selected=index, pdc_selected=pdc_sel, phd_selected=phd_sel,
                          reconstructed=reconstructed, ptc=ptc,
                          ptc_selected=None if ptc is None else float(ptc[ref]))


def deciding_consistency(config: Config, models: Sequence[torch.nn.Module], case: PreparedCase,
                         preds: np.ndarray, pdc: np.ndarray, phd: np.ndarray, thresholds: Thresholds,
                         device: torch.device) -> np.ndarray | None:
    """pTC (m,) where it decides the case's flag, NaN elsewhere; None with ``qc.consistency`` off.

    The case is flagged when no candidate passes every fence, so only candidates that pass pDC's
    and pHD's fences need pTC, and only until one passes pTC's too: the flag is the one scoring
    every candidate gives (tested), at a third of the cost on a good case (5 passes instead of 15).
    """
    if config.qc.consistency != "tta":
        return None
    ptc = np.full(len(models), np.nan)
    if thresholds.th_low_ptc is None:
        return ptc
    for i in np.flatnonzero(candidate_passes(pdc[None], phd[None], thresholds)[0]):
        ptc[i] = candidate_consistency(models, case, preds, config.qc, device, indices=[int(i)])[i]
        if ptc[i] >= thresholds.th_low_ptc:
            break
    return ptc


def site_reconstructs(config: Config, models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
                      cases: Sequence[PreparedCase], thresholds: Thresholds, device: torch.device) -> bool:
    """Whether a site's output is R's reconstruction (``qc.reconstruction_floor``): the median pDC of
    the selection over ``cases`` (the site's cases being predicted, no label read) is below the floor.

    A site-level switch to Post-DAE for when the segmenter has failed at the site: measured per case,
    the same floor also replaced good predictions that R reconstructed badly; per site, it moved only
    the site-views whose segmenter had failed (docs/QC.md, ``benchmarks/reconstruction_floor.py``).
    Off (False, nothing scored) at floor 0, the default.
    """
    if config.qc.reconstruction_floor <= 0 or not cases:
        return False
    return below_floor(config.qc.reconstruction_floor,
                       [predict_case(config, models, autoencoder, case, thresholds, device).pdc_selected
                        for case in cases])


def below_floor(floor: float, pdc_selected: Sequence[float]) -> bool:
    """The ``qc.reconstruction_floor`` rule on a site's selection pDCs: their median is below the floor."""
    return floor > 0 and len(pdc_selected) > 0 and bool(np.median(pdc_selected) < floor)
