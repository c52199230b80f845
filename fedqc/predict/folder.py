"""Inference at a site: QC-based candidate selection, predictions in the original geometry, QC report.

Writes, per case, ``<case_id>_pred.nii.gz`` (labels 0..3 with the input's affine and header, so it
overlays the image in any viewer), ``qc.csv`` (pDC, pHD, OoD flag, selected candidate) and an
overlay PNG (image, prediction, reconstruction) for every flagged case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fedqc.config import Config
from fedqc.core.device import select_device
from fedqc.core.io import atomic_write
from fedqc.core.types import View
from fedqc.data.mnms2 import Case
from fedqc.data.nifti import load_image, save_label
from fedqc.data.preprocess import restore_probabilities
from fedqc.data.site import prepare_case, spec_from_config
from fedqc.models.run_folder import (
    has_stage,
    load_autoencoder,
    load_candidates,
    thresholds_path,
)
from fedqc.predict.case import predict_case
from fedqc.predict.overlay import overlay_png
from fedqc.predict.postprocess import largest_component_per_structure
from fedqc.qc.fences import choose_fences, fit_fences
from fedqc.qc.thresholds import Thresholds


def choose_thresholds(config: Config, run: Path, view: View, models, ae, prepared, device) -> Thresholds:
    """The fences of the cases being predicted, by :func:`fedqc.qc.fences.choose_fences`: the run's
    labelled-validation fences, or the paper's fences fitted on these cases themselves."""
    val_path = thresholds_path(run, view, "labelled-val")
    return choose_fences(config.qc.threshold_source,
                         labelled_val=(lambda: Thresholds.from_json(val_path)) if val_path.is_file() else None,
                         unlabelled=lambda: fit_fences(config, models, ae, prepared, "unlabelled", device),
                         where=f"{view} cases to predict")


def predict_cases(config: Config, models: Sequence[torch.nn.Module], ae: torch.nn.Module,
                  cases: Sequence[Case], thresholds: Thresholds | None, out: Path, device: torch.device,
                  run: Path | None = None, selection: bool = True,
                  progress: Callable[[str], None] | None = print) -> list[dict]:
    """Predict ``cases`` of one view and write their files; returns the qc.csv rows."""
    spec = spec_from_config(config.preprocess)
    out.mkdir(parents=True, exist_ok=True)
    prepared = [prepare_case(c, spec, with_labels=False) for c in cases]
    if thresholds is None:
        thresholds = choose_thresholds(config, run, cases[0].view, models, ae, prepared, device)
    rows = []
    for i, (case, item) in enumerate(zip(cases, prepared)):
        result = predict_case(config, models, ae, item, thresholds, device, selection=selection)
        labels = restore_probabilities(result.probs, item.geometry)
        if config.refine.largest_component:
            labels = largest_component_per_structure(labels)
        save_label(out / f"{case.case_id}_pred.nii.gz", labels, load_image(case.image))
        if result.ood:
            overlay_png(out / "overlays" / f"{case.case_id}.png", item.images, result.labels,
                        result.reconstruction, f"{case.case_id}: OoD (pDC {result.pdc_selected:.3f}, "
                                               f"pHD {result.phd_selected:.1f} mm)")
        rows.append({"case_id": case.case_id, "subject": case.subject, "view": case.view, "phase": case.phase,
                     "pdc": round(result.pdc_selected, 5), "phd_mm": round(result.phd_selected, 4),
                     "ood": result.ood, "selected": "fallback" if result.selected is None else result.selected,
                     "pdc_candidates": " ".join(f"{v:.4f}" for v in result.pdc),
                     "phd_candidates": " ".join(f"{v:.3f}" for v in result.phd),
                     "th_low_pdc": round(thresholds.th_low_pdc, 5), "th_up_phd": round(thresholds.th_up_phd, 4)})
        if progress and ((i + 1) % 20 == 0 or i + 1 == len(cases)):
            progress(f"  predicted {i + 1}/{len(cases)} {case.view} cases")
    return rows


def predict_folder(config: Config, run: Path, cases: Sequence[Case], out: Path, stage: str = "refined",
                   progress: Callable[[str], None] | None = print) -> list[dict]:
    """``fedqc predict``: every view of the run, then ``qc.csv`` (written once, atomically)."""
    from fedqc.core.io import csv_text

    device = select_device(config.train.device)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for view in config.views:
        view_cases = [c for c in cases if c.view == view]
        if not view_cases:
            continue
        use = stage if has_stage(run, view, stage) else "supervised"
        if progress:
            progress(f"[{view}] {len(view_cases)} cases with the {use} candidates")
        models = load_candidates(run, view, use, config, device)
        ae = load_autoencoder(run, view, config, device)
        rows += predict_cases(config, models, ae, view_cases, None, out, device, run=run, progress=progress)
    atomic_write(out / "qc.csv", csv_text(rows))
    return rows
