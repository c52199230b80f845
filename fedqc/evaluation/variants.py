"""The paper's ablation, per site: M, {M}+QC and full, scored against ground truth in mm.

* M: the best single supervised checkpoint.
* {M}+QC: QC-based candidate selection among the m_best supervised checkpoints (K_semi = 0).
* full: QC-based selection among the m_best refined checkpoints.

Cases are scored in their original geometry (the prediction restored exactly as ``fedqc predict``
writes it). The same pass records each case's pDC/pHD and OoD flag under M, so QC calibration
(Spearman of pDC with true Dice, of pHD with true HD; how well the flag finds cases with true RV
Dice below 0.8) comes for free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from fedqc.adapt.peers import PEER_VARIANTS
from fedqc.config import Config
from fedqc.data.nifti import load_image, load_label
from fedqc.data.preprocess import restore_probabilities
from fedqc.data.site import PreparedCase
from fedqc.evaluation.evaluate import score_labels
from fedqc.predict.case import below_floor, predict_case
from fedqc.predict.postprocess import largest_component_per_structure
from fedqc.qc.metrics import dice as dice_fn
from fedqc.qc.thresholds import Thresholds

# M+sup / {M+sup}+QC: the compute-matched control, refinement's supervised share without the
# QC-driven part (fedqc.fl.protocol's control phase): the gain QC brings is full - {M+sup}+QC.
VARIANTS = ("M", "{M}+QC", "M+sup", "{M+sup}+QC", "full")
# The label-free peers (fedqc.adapt), present when the config lists them (adapt.peers).
PEERS = tuple(PEER_VARIANTS.values())
# Each peer on top of full's first refined candidate (the federated report: a site adapting the
# consortium's refined model further on its own pool), to measure whether combining them helps.
PEERS_ON_FULL = tuple(f"full+{p}" for p in PEERS)
BAD_DICE = 0.8


@dataclass
class CaseRecord:
    site: str
    case_id: str
    view: str
    variant: str
    rv_dice: float
    rv_hd_mm: float
    rv_dice_lcc: float
    rv_hd_mm_lcc: float
    pdc: float
    phd: float
    ood: bool
    # Pseudo-label quality (network grid, RV): how close R's reconstruction of the selected
    # prediction is to the truth, beside the prediction's own Dice. Refinement pulls predictions
    # toward the reconstruction, so this bounds what it can recover.
    recon_rv_dice_grid: float = float("nan")
    pred_rv_dice_grid: float = float("nan")
    # pTC of the output (CasePrediction.ptc_selected), NaN without qc.consistency.
    ptc: float = float("nan")


def score_case_variants(config: Config, site: str, case: PreparedCase,
                        candidates: Mapping[str, tuple[Sequence[torch.nn.Module], bool]],
                        autoencoder: torch.nn.Module, thresholds: Thresholds,
                        device: torch.device, reconstructing: frozenset[str] = frozenset()) -> list[CaseRecord]:
    """Score one labelled case under each variant (name -> (models, use QC selection)); the variants
    in ``reconstructing`` output R's reconstruction of their selection (:func:`score_site_variants`)."""
    image = load_image(case.case.image)
    ref = load_label(case.case.label, image)
    records = []
    for variant, (models, selection) in candidates.items():
        result = predict_case(config, models, autoencoder, case, thresholds, device, selection=selection,
                              reconstruct=variant in reconstructing)
        labels = restore_probabilities(result.probs, case.geometry)
        dice, hd = score_labels(labels, ref, image.spacing_mm)
        dice_l, hd_l = score_labels(largest_component_per_structure(labels), ref, image.spacing_mm)
        grid = {}
        if case.labels is not None:
            rv = (3,)
            grid = {"recon_rv_dice_grid": float(dice_fn(result.reconstruction, case.labels, rv)[0]),
                    "pred_rv_dice_grid": float(dice_fn(result.labels, case.labels, rv)[0])}
        if result.ptc_selected is not None:
            grid["ptc"] = result.ptc_selected
        records.append(CaseRecord(site, case.case_id, case.case.view, variant, dice["RV"], hd["RV"],
                                  dice_l["RV"], hd_l["RV"], result.pdc_selected, result.phd_selected, result.ood,
                                  **grid))
    return records


def score_site_variants(config: Config, site: str, cases: Sequence[PreparedCase],
                        candidates: Mapping[str, tuple[Sequence[torch.nn.Module], bool]],
                        autoencoder: torch.nn.Module, thresholds: Thresholds,
                        device: torch.device) -> list[CaseRecord]:
    """:func:`score_case_variants` over a site's cases, each selecting variant under the site's own
    ``qc.reconstruction_floor`` decision on these cases (:func:`fedqc.predict.case.below_floor` of
    the selections' pDC, read from the records themselves: only a variant that switches is scored
    again, so the default costs nothing extra)."""
    per_case = [score_case_variants(config, site, case, candidates, autoencoder, thresholds, device)
                for case in cases]
    switching = frozenset(variant for variant, (_, selection) in candidates.items() if selection and below_floor(
        config.qc.reconstruction_floor, [r.pdc for records in per_case for r in records if r.variant == variant]))
    if switching:
        again = {v: candidates[v] for v in switching}
        per_case = [[r for r in records if r.variant not in switching] + score_case_variants(
            config, site, case, again, autoencoder, thresholds, device, switching)
            for case, records in zip(cases, per_case)]
    return [r for records in per_case for r in records]


def summarise_variants(records: Sequence[CaseRecord]) -> list[dict]:
    """Mean RV Dice / HD per (site, view, variant), with and without largest-component post-processing."""
    rows = []
    keys = sorted({(r.site, r.view) for r in records})
    for site, view in keys:
        for variant in VARIANTS + PEERS + PEERS_ON_FULL:
            sel = [r for r in records if r.site == site and r.view == view and r.variant == variant]
            if not sel:
                continue
            rows.append({"site": site, "view": view, "variant": variant, "n": len(sel),
                         "rv_dice": float(np.mean([r.rv_dice for r in sel])),
                         "rv_hd_mm": float(np.mean([r.rv_hd_mm for r in sel])),
                         "rv_dice_lcc": float(np.mean([r.rv_dice_lcc for r in sel])),
                         "rv_hd_mm_lcc": float(np.mean([r.rv_hd_mm_lcc for r in sel])),
                         "flagged": int(sum(r.ood for r in sel)),
                         "flagged_pred_rv_dice_grid": _nanmean([r.pred_rv_dice_grid for r in sel if r.ood]),
                         "flagged_recon_rv_dice_grid": _nanmean([r.recon_rv_dice_grid for r in sel if r.ood])})
    return rows


def _nanmean(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def calibration(records: Sequence[CaseRecord], variant: str = "M") -> dict:
    """QC calibration on one variant's records: Spearman correlations and OoD-flag detection quality."""
    sel = [r for r in records if r.variant == variant]
    if len(sel) < 3:
        return {"n": len(sel)}
    dice = np.array([r.rv_dice for r in sel])
    hd = np.array([r.rv_hd_mm for r in sel])
    pdc = np.array([r.pdc for r in sel])
    phd = np.array([r.phd for r in sel])
    flag = np.array([r.ood for r in sel])
    bad = dice < BAD_DICE
    out = {"n": len(sel), "n_bad": int(bad.sum()), "n_flagged": int(flag.sum()),
           "spearman_pdc_dice": float(stats.spearmanr(pdc, dice).statistic),
           "spearman_phd_hd": float(stats.spearmanr(phd, hd).statistic)}
    tp = int((flag & bad).sum())
    out["precision"] = tp / int(flag.sum()) if flag.any() else float("nan")
    out["recall"] = tp / int(bad.sum()) if bad.any() else float("nan")
    out["auroc_pdc"] = auroc(-pdc, bad) if 0 < bad.sum() < len(bad) else float("nan")
    ptc = np.array([r.ptc for r in sel])
    if np.isfinite(ptc).all():  # qc.consistency: the same two measures of pTC
        out["spearman_ptc_dice"] = float(stats.spearmanr(ptc, dice).statistic)
        out["auroc_ptc"] = auroc(-ptc, bad) if 0 < bad.sum() < len(bad) else float("nan")
    return out


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (Mann-Whitney U, ties counted half)."""
    ranks = stats.rankdata(score)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def flag_quality(flags: np.ndarray, true_dice: np.ndarray) -> dict:
    """Precision / recall of OoD flags at finding cases whose true RV Dice (under M) is below 0.8."""
    flags, bad = np.asarray(flags, dtype=bool), np.asarray(true_dice) < BAD_DICE
    tp = int((flags & bad).sum())
    return {"n": int(len(bad)), "n_bad": int(bad.sum()), "n_flagged": int(flags.sum()), "true_positives": tp,
            "precision": tp / int(flags.sum()) if flags.any() else None,
            "recall": tp / int(bad.sum()) if bad.any() else None}
