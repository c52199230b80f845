"""Inference at a site: QC-based candidate selection, predictions in the original geometry, QC report.

Writes, per case, ``<case_id>_pred.nii.gz`` (labels 0..3 with the input's affine and header, so it
overlays the image in any viewer), an overlay PNG (image, prediction, reconstruction) in
``overlays/`` for every flagged case and a smaller one in ``review/`` for every case; then, once at
the end, ``qc.csv`` (pDC, pHD, OoD flag, selected candidate, Dice where a label exists, and the
error of a case that could not be predicted) and ``qc.html``, the QC review page
(:mod:`fedqc.predict.review`).

A bad case does not stop the others: its row in ``qc.csv`` carries the reason (``error``) and the
caller reports every failure at the end (:class:`PredictionErrors`). The folder is left describing
this run only: predictions, overlays and thumbnails that an earlier run left and this one did not
produce are removed (other files are not touched), so ``qc.csv`` lists exactly what is there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fedqc.config import Config
from fedqc.core.device import select_device
from fedqc.core.errors import DataError, FedqcError
from fedqc.core.io import atomic_write
from fedqc.core.types import CLASS_NAMES, View
from fedqc.data.mnms2 import Case
from fedqc.data.nifti import load_image, load_label, save_label
from fedqc.data.preprocess import restore_probabilities
from fedqc.data.site import prepare_case, spec_from_config
from fedqc.models.run_folder import (
    check_refined,
    has_stage,
    load_autoencoder,
    load_candidates,
    thresholds_path,
    training_id,
)
from fedqc.predict.case import predict_case, site_reconstructs
from fedqc.predict.overlay import overlay_png
from fedqc.predict.postprocess import largest_component_per_structure
from fedqc.qc.fences import choose_fences, fit_fences
from fedqc.qc.metrics import dice
from fedqc.qc.thresholds import FORMAT, QUANTILE_METHOD, Thresholds

PRED_SUFFIX = "_pred.nii.gz"
OVERLAYS, REVIEW = "overlays", "review"
REVIEW_DPI = 55  # the review page's thumbnails: one per case, embedded in qc.html


class PredictionErrors(FedqcError):
    """Some cases could not be predicted; every other one is written. Lists each with its reason."""

    def __init__(self, out: Path, rows: Sequence[Mapping]):
        failed = [r for r in rows if r.get("error")]
        self.failed = failed
        lines = "\n".join(f"  {r['error']}" for r in failed)
        super().__init__(f"{out}: {len(failed)} of {len(rows)} cases could not be predicted (the other "
                         f"{len(rows) - len(failed)} are written; qc.csv lists every case):\n{lines}")


def write_fences(path: Path, fences: Thresholds, key: Mapping[str, str]) -> Path:
    """Fences as :meth:`Thresholds.to_json` writes them plus ``"run": key``, what they were fitted
    under (a training id, a site's run key), checked by whoever reads them back (:func:`fences_key`)."""
    record = {"format": FORMAT, "quantile_method": QUANTILE_METHOD, **asdict(fences), "run": dict(key)}
    return atomic_write(path, json.dumps(record, indent=2) + "\n")


def fences_key(path: Path) -> dict[str, str]:
    """The ``"run"`` key written with fences by :func:`write_fences` (empty when none or unreadable)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    key = record.get("run") if isinstance(record, dict) else None
    return {str(k): str(v) for k, v in key.items()} if isinstance(key, dict) else {}


def labelled_val_fences(run: Path, view: View):
    """A provider of the run's labelled-validation fences of ``view`` (None when there are none).

    Raises:
        DataError: the fences were fitted under another training than the run's current one.
    """
    val_path = thresholds_path(run, view, "labelled-val")
    if not val_path.is_file():
        return None
    recorded, current = fences_key(val_path).get("training", ""), training_id(run, view)
    if recorded != current:
        raise DataError(val_path, f"fitted under another training ({recorded or 'none recorded'}; the "
                                  f"supervised models now are training {current}); rerun 'fedqc train'")
    return lambda: Thresholds.from_json(val_path)


def choose_thresholds(config: Config, run: Path, view: View, models, ae, prepared, device) -> Thresholds:
    """The fences of the cases being predicted, by :func:`fedqc.qc.fences.choose_fences`: the run's
    labelled-validation fences (refused when fitted under another training), or the paper's fences
    fitted on these cases themselves."""
    return choose_fences(config.qc.threshold_source, labelled_val=labelled_val_fences(run, view),
                         unlabelled=lambda: fit_fences(config, models, ae, prepared, "unlabelled", device),
                         where=f"{view} cases to predict")


def _row(case: Case, thresholds: Thresholds | None, **values) -> dict:
    """One qc.csv row; every row has every column (a failed case's metrics are empty)."""
    row = {"case_id": case.case_id, "subject": case.subject, "view": case.view, "phase": case.phase,
           "pdc": "", "phd_mm": "", "ptc": "", "ood": "", "selected": "", "output": "", "pdc_candidates": "",
           "phd_candidates": "", "ptc_candidates": "",
           "th_low_pdc": "" if thresholds is None else round(thresholds.th_low_pdc, 5),
           "th_up_phd": "" if thresholds is None else round(thresholds.th_up_phd, 4),
           "th_low_ptc": "" if thresholds is None or thresholds.th_low_ptc is None else round(thresholds.th_low_ptc, 5),
           "dice": "", "error": ""}
    row.update(values)
    return row


def foreground_dice(prediction: np.ndarray, case: Case, image) -> float | str:
    """Mean Dice of LV, MYO and RV against the case's label, in the original geometry ("" without one)."""
    if case.label is None:
        return ""
    try:
        reference = load_label(case.label, image)
    except DataError:
        return ""  # a bad label spoils no prediction; `fedqc evaluate` names it
    return round(float(np.mean(dice(prediction, reference, tuple(CLASS_NAMES)))), 5)


def predict_cases(config: Config, models: Sequence[torch.nn.Module], ae: torch.nn.Module,
                  cases: Sequence[Case], thresholds: Thresholds | None, out: Path, device: torch.device,
                  run: Path | None = None, selection: bool = True,
                  progress: Callable[[str], None] | None = print, with_dice: bool = False) -> list[dict]:
    """Predict ``cases`` of one view and write their files; returns the qc.csv rows, in case order.

    A case whose files cannot be read gets a row with its ``error`` and no prediction; the others
    go on. ``with_dice``: score each prediction against the case's label where it has one (the
    review page's pDC-vs-Dice plot); never set it where labels must not be read.
    """
    spec = spec_from_config(config.preprocess)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    prepared = []
    for case in cases:
        try:
            prepared.append((case, prepare_case(case, spec, with_labels=False)))
        except DataError as exc:
            rows[case.case_id] = _row(case, thresholds, error=str(exc))
    if prepared and thresholds is None:
        thresholds = choose_thresholds(config, run, cases[0].view, models, ae, [p for _, p in prepared], device)
    reconstruct = selection and site_reconstructs(config, models, ae, [p for _, p in prepared], thresholds, device)
    for i, (case, item) in enumerate(prepared):
        try:
            result = predict_case(config, models, ae, item, thresholds, device, selection=selection,
                                  reconstruct=reconstruct)
            labels = restore_probabilities(result.probs, item.geometry)
            if config.refine.largest_component:
                labels = largest_component_per_structure(labels)
            image = load_image(case.image)
            save_label(out / f"{case.case_id}{PRED_SUFFIX}", labels, image)
        except DataError as exc:
            rows[case.case_id] = _row(case, thresholds, error=str(exc))
            continue
        ptc = result.ptc_selected
        what = f"pDC {result.pdc_selected:.3f}, pHD {result.phd_selected:.1f} mm" + (
            "" if ptc is None else f", pTC {ptc:.3f}")
        if result.ood:
            overlay_png(out / OVERLAYS / f"{case.case_id}.png", item.images, result.labels,
                        result.reconstruction, f"{case.case_id}: OoD ({what})")
        overlay_png(out / REVIEW / f"{case.case_id}.png", item.images, result.labels, result.reconstruction,
                    f"{case.case_id}{': OoD' if result.ood else ''} ({what})", dpi=REVIEW_DPI)
        rows[case.case_id] = _row(
            case, thresholds, pdc=round(result.pdc_selected, 5), phd_mm=round(result.phd_selected, 4),
            ptc="" if ptc is None else round(ptc, 5),
            ood=result.ood, selected="fallback" if result.selected is None else result.selected,
            output="reconstruction" if result.reconstructed else "candidate",
            pdc_candidates=" ".join(f"{v:.4f}" for v in result.pdc),
            phd_candidates=" ".join(f"{v:.3f}" for v in result.phd),
            ptc_candidates="" if result.ptc is None else " ".join(f"{v:.4f}" for v in result.ptc),
            dice=foreground_dice(labels, case, image) if with_dice else "")
        if progress and ((i + 1) % 20 == 0 or i + 1 == len(prepared)):
            progress(f"  predicted {i + 1}/{len(cases)} {case.view} cases")
    return [rows[c.case_id] for c in cases]


def remove_stale(out: Path, rows: Sequence[Mapping]) -> list[Path]:
    """Remove the predictions, overlays and review thumbnails in ``out`` that ``rows`` did not produce."""
    produced = {r["case_id"] for r in rows if not r.get("error")}
    flagged = {r["case_id"] for r in rows if not r.get("error") and str(r.get("ood")) == "True"}
    stale = [p for p in out.glob(f"*{PRED_SUFFIX}") if p.name[:-len(PRED_SUFFIX)] not in produced]
    stale += [p for p in (out / OVERLAYS).glob("*.png") if p.stem not in flagged]
    stale += [p for p in (out / REVIEW).glob("*.png") if p.stem not in produced]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def finish_predictions(out: Path, rows: Sequence[Mapping], title: str,
                       progress: Callable[[str], None] | None = print) -> list[Path]:
    """After every view: remove what earlier runs left (:func:`remove_stale`), then write ``qc.csv``
    and ``qc.html``, each once and atomically. Returns the removed files."""
    from fedqc.core.io import csv_text
    from fedqc.predict.review import write_review

    removed = remove_stale(out, rows)
    n_preds = sum(1 for p in removed if p.name.endswith(PRED_SUFFIX))
    if removed and progress:
        progress(f"removed {n_preds} stale predictions of an earlier run from {out} (and "
                 f"{len(removed) - n_preds} of its overlay PNGs): qc.csv describes this run only")
    atomic_write(out / "qc.csv", csv_text(rows))
    write_review(out, rows, title=title)
    return removed


def predict_folder(config: Config, run: Path, cases: Sequence[Case], out: Path, stage: str = "refined",
                   progress: Callable[[str], None] | None = print) -> list[dict]:
    """``fedqc predict``: every view of the run, then ``qc.csv`` and ``qc.html`` (written once, atomically).

    Rows of cases that could not be predicted carry their ``error``; the caller reports them.

    Raises:
        DataError: refined models of another training (before anything is written).
    """
    device = select_device(config.train.device)
    uses = {}
    for view in config.views:
        if any(c.view == view for c in cases):
            uses[view] = stage if has_stage(run, view, stage) else "supervised"
            if uses[view] == "refined":
                check_refined(run, view)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for view, use in uses.items():
        view_cases = [c for c in cases if c.view == view]
        if progress:
            progress(f"[{view}] {len(view_cases)} cases with the {use} candidates")
        models = load_candidates(run, view, use, config, device)
        ae = load_autoencoder(run, view, config, device)
        rows += predict_cases(config, models, ae, view_cases, None, out, device, run=run, progress=progress,
                              with_dice=True)
    finish_predictions(out, rows, title=f"QC review: {run.name} on {out}", progress=progress)
    return rows
