"""Dice and Hausdorff distance (mm) of predictions against ground truth, in the original geometry.

Reported per view for RV (the M&Ms-2 ranking structure) and LV, MYO, then stratified per vendor,
centre and pathology as in the paper's Table 1. Predictions are the ``*_pred.nii.gz`` files that
``fedqc predict`` writes; both are read back from disk, so what is scored is what a user gets.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedqc.core.errors import DataError
from fedqc.core.types import CLASS_NAMES
from fedqc.data.mnms2 import Case, discover_cases
from fedqc.data.nifti import load_image, load_label
from fedqc.qc.metrics import dice, hausdorff_mm

STRATA = ("VENDOR", "CENTRE", "DISEASE")


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    subject: str
    view: str
    phase: str
    meta: dict[str, str]
    dice: dict[str, float]
    hd_mm: dict[str, float]


def pred_path(pred_dir: Path, case: Case) -> Path:
    return pred_dir / f"{case.case_id}_pred.nii.gz"


def score_labels(pred: np.ndarray, ref: np.ndarray, spacing_xyz_mm: Sequence[float]) -> tuple[dict, dict]:
    """Per-structure Dice and symmetric Hausdorff (mm) of two (X, Y, Z) label maps."""
    classes = tuple(CLASS_NAMES)
    # The QC metrics take (Z, H, W) stacks with (z, h, w) spacing; NIfTI arrays are (X, Y, Z).
    a = np.moveaxis(pred, 2, 0)
    b = np.moveaxis(ref, 2, 0)
    spacing = (spacing_xyz_mm[2], spacing_xyz_mm[0], spacing_xyz_mm[1])
    d = dice(a, b, classes)
    h = hausdorff_mm(a, b, spacing, classes)
    return ({CLASS_NAMES[c]: float(v) for c, v in zip(classes, d)},
            {CLASS_NAMES[c]: float(v) for c, v in zip(classes, h)})


LABEL_HINT = ("fedqc evaluate reads labels as M&Ms-2 stores them (0 background, 1 LV, 2 MYO, 3 RV) and has no "
              "remap option: convert the label files first (ACDC, for one, swaps 1 and 3)")


def evaluate_predictions(data_dir: Path, pred_dir: Path, cases: Iterable[Case] | None = None,
                         progress: Callable[[str], None] | None = print,
                         failures: list[DataError] | None = None) -> list[CaseResult]:
    """Score every labelled case of ``data_dir`` that has a prediction in ``pred_dir``.

    A case whose image, label or prediction cannot be read is skipped and the others scored; with
    ``failures`` given, each such case's :class:`DataError` is appended to it, otherwise they are
    raised together at the end (:class:`fedqc.data.site.BadCasesError`).
    """
    from fedqc.data.site import raise_collected

    cases = [c for c in (cases if cases is not None else discover_cases(data_dir)) if c.label is not None]
    if not cases:
        raise DataError(data_dir, "no labelled cases (*_gt.nii.gz) to evaluate against")
    results, missing, bad = [], [], []
    for i, case in enumerate(cases):
        path = pred_path(pred_dir, case)
        if not path.exists():
            missing.append(case.case_id)
            continue
        try:
            image = load_image(case.image)
            ref = _label(case.label, image)
            pred = _label(path, image)
        except DataError as exc:
            bad.append(exc)
            continue
        d, h = score_labels(pred, ref, image.spacing_mm)
        results.append(CaseResult(case.case_id, case.subject, case.view, case.phase, dict(case.meta), d, h))
        if progress and (i + 1) % 50 == 0:
            progress(f"  evaluated {i + 1}/{len(cases)} cases")
    if missing and progress:
        progress(f"  note: {len(missing)} labelled cases have no prediction (e.g. {missing[0]})")
    if failures is not None:
        failures.extend(bad)
    elif bad:
        raise_collected(bad, "case(s) could not be evaluated")
    if not results and not bad:
        raise DataError(pred_dir, f"no predictions (*_pred.nii.gz) found for the {len(cases)} labelled cases")
    return results


def _label(path: Path, image):
    """A label (or prediction) map; values outside 0..3 get a hint that fits this command."""
    return load_label(path, image, hint=LABEL_HINT)


def summarise(results: Sequence[CaseResult], structure: str = "RV") -> dict:
    """Mean +- std of Dice and HD per view, overall and per stratum (vendor, centre, pathology)."""

    def stats(rows: Sequence[CaseResult]) -> dict:
        dc = np.array([r.dice[structure] for r in rows])
        hd = np.array([r.hd_mm[structure] for r in rows])
        return {"n": len(rows), "dice_mean": float(dc.mean()), "dice_std": float(dc.std()),
                "hd_mm_mean": float(hd.mean()), "hd_mm_std": float(hd.std())}

    out: dict = {}
    for view in sorted({r.view for r in results}):
        rows = [r for r in results if r.view == view]
        entry = {"all": stats(rows), **{s: {} for s in STRATA}}
        for stratum in STRATA:
            groups: dict[str, list[CaseResult]] = defaultdict(list)
            for r in rows:
                if stratum in r.meta:
                    groups[r.meta[stratum]].append(r)
            entry[stratum] = {k: stats(v) for k, v in sorted(groups.items())}
        out[view] = entry
    return out


def results_as_json(results: Sequence[CaseResult]) -> dict:
    return {"cases": [asdict(r) for r in results],
            "summary": {s: summarise(results, s) for s in CLASS_NAMES.values()}}


def format_summary(results: Sequence[CaseResult]) -> str:
    """A readable table: per view, RV/LV/MYO overall, then RV per stratum."""
    lines = [f"{'view':<4} {'group':<22} {'n':>4} {'RV Dice':>14} {'RV HD mm':>14} {'LV Dice':>8} {'MYO Dice':>8}"]
    rv, lv, myo = (summarise(results, s) for s in ("RV", "LV", "MYO"))
    for view, entry in rv.items():
        a = entry["all"]
        lines.append(f"{view:<4} {'all':<22} {a['n']:>4} {a['dice_mean']:>7.3f}±{a['dice_std']:<6.3f}"
                     f"{a['hd_mm_mean']:>7.2f}±{a['hd_mm_std']:<6.2f} {lv[view]['all']['dice_mean']:>8.3f}"
                     f" {myo[view]['all']['dice_mean']:>8.3f}")
        for stratum in STRATA:
            for group, g in entry[stratum].items():
                label = f"{stratum.lower()} {group}"[:22]
                lines.append(f"{'':<4} {label:<22} {g['n']:>4} {g['dice_mean']:>7.3f}±{g['dice_std']:<6.3f}"
                             f"{g['hd_mm_mean']:>7.2f}±{g['hd_mm_std']:<6.2f}")
    return "\n".join(lines)
