"""OoD detection (paper Sec. 2.3): a case is OoD when none of its m candidates passes both fences.

A candidate passes when ``pdc >= th_low_pdc`` and ``phd <= th_up_phd``; it fails when
``pdc < th_low_pdc`` or ``phd > th_up_phd`` (a NaN score fails). The case is flagged when every
one of its m_best candidates fails, which is the same as "its best candidate fails".
"""

from __future__ import annotations

import numpy as np

from fedqc.qc.thresholds import Thresholds


def candidate_passes(pdc: np.ndarray, phd: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """Which candidates pass both fences.

    Args:
        pdc: ``(n_cases, m)`` pDC per candidate (a 1-D array is read as ``m == 1``).
        phd: pHD in mm, same shape.
        thresholds: the fitted fences.

    Returns:
        Boolean ``(n_cases, m)``: True where the candidate passes.
    """
    pdc, phd = _as_matrix(pdc), _as_matrix(phd)
    if pdc.shape != phd.shape:
        raise ValueError(f"pdc and phd differ in shape: {pdc.shape} vs {phd.shape}")
    return (pdc >= thresholds.th_low_pdc) & (phd <= thresholds.th_up_phd)


def flag_ood(pdc: np.ndarray, phd: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """OoD flag per case: True when no candidate passes both fences.

    Args:
        pdc: ``(n_cases, m)`` pDC per candidate (a 1-D array is read as ``m == 1``).
        phd: pHD in mm, same shape.
        thresholds: the fitted fences.

    Returns:
        Boolean ``(n_cases,)``.
    """
    return ~candidate_passes(pdc, phd, thresholds).any(axis=1)


def _as_matrix(values: np.ndarray) -> np.ndarray:
    """Scores as a float ``(n_cases, m)`` array."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        return values[:, None]
    if values.ndim != 2:
        raise ValueError(f"scores must be (n_cases, m), got shape {values.shape}")
    return values
