"""Quality control stages: pseudo-metrics, Tukey thresholds, OoD flags and candidate selection.

Data flow: ``pseudo_scores_batch`` (pDC / pHD of prediction vs. reconstruction) ->
``fit_from_candidates`` (Eq. 3-4 fences) -> ``flag_ood`` (refinement trigger) ->
``select_candidate`` / ``apply_selection`` (final prediction). The batched torch path lives in
:mod:`fedqc.qc.metrics_torch` and is not imported here, so this package needs only NumPy.
See docs/QC.md for the conventions.
"""

from fedqc.qc.metrics import (
    dice,
    dice_hausdorff_mm_batch,
    empty_structure_cap_mm,
    hausdorff_mm,
    pseudo_scores,
    pseudo_scores_batch,
)
from fedqc.qc.ood import candidate_passes, flag_ood
from fedqc.qc.selection import Selection, apply_selection, rank_by_pdc, select_candidate
from fedqc.qc.thresholds import (
    ThresholdFitError,
    Thresholds,
    fit_from_candidates,
    fit_tukey_thresholds,
)

__all__ = [
    "Selection",
    "ThresholdFitError",
    "Thresholds",
    "apply_selection",
    "candidate_passes",
    "dice",
    "dice_hausdorff_mm_batch",
    "empty_structure_cap_mm",
    "fit_from_candidates",
    "fit_tukey_thresholds",
    "flag_ood",
    "hausdorff_mm",
    "pseudo_scores",
    "pseudo_scores_batch",
    "rank_by_pdc",
    "select_candidate",
]
