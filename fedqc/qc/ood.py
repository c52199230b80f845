"""OoD detection (paper Sec. 2.3): a case is OoD when none of its m candidates passes the fences.

A candidate passes when ``pdc >= th_low_pdc`` and ``phd <= th_up_phd`` (and, when both the scores
and the fences have pTC, ``ptc >= th_low_ptc``: ``qc.consistency``); it fails otherwise (a NaN score
fails). The case is flagged when every
one of its m_best candidates fails, which is the same as "its best candidate fails".
"""

from __future__ import annotations

import numpy as np

from fedqc.qc.thresholds import Thresholds


def candidate_passes(pdc: np.ndarray, phd: np.ndarray, thresholds: Thresholds,
                     ptc: np.ndarray | None = None) -> np.ndarray:
    """Which candidates pass the fences.

    Args:
        pdc: ``(n_cases, m)`` pDC per candidate (a 1-D array is read as ``m == 1``).
        phd: pHD in mm, same shape.
        thresholds: the fitted fences.
        ptc: pTC, same shape, or None; judged only when the fences have a pTC fence.

    Returns:
        Boolean ``(n_cases, m)``: True where the candidate passes.
    """
    pdc, phd = _as_matrix(pdc), _as_matrix(phd)
    if pdc.shape != phd.shape:
        raise ValueError(f"pdc and phd differ in shape: {pdc.shape} vs {phd.shape}")
    passes = (pdc >= thresholds.th_low_pdc) & (phd <= thresholds.th_up_phd)
    if ptc is not None and thresholds.th_low_ptc is not None:
        ptc = _as_matrix(ptc)
        if ptc.shape != pdc.shape:
            raise ValueError(f"ptc and pdc differ in shape: {ptc.shape} vs {pdc.shape}")
        passes &= ptc >= thresholds.th_low_ptc
    return passes


def flag_ood(pdc: np.ndarray, phd: np.ndarray, thresholds: Thresholds,
             ptc: np.ndarray | None = None) -> np.ndarray:
    """OoD flag per case: True when no candidate passes the fences.

    Args:
        pdc: ``(n_cases, m)`` pDC per candidate (a 1-D array is read as ``m == 1``).
        phd: pHD in mm, same shape.
        thresholds: the fitted fences.
        ptc: pTC, same shape, or None (:func:`candidate_passes`).

    Returns:
        Boolean ``(n_cases,)``.
    """
    return ~candidate_passes(pdc, phd, thresholds, ptc).any(axis=1)


def _as_matrix(values: np.ndarray) -> np.ndarray:
    """Scores as a float ``(n_cases, m)`` array."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        return values[:, None]
    if values.ndim != 2:
        raise ValueError(f"scores must be (n_cases, m), got shape {values.shape}")
    return values
