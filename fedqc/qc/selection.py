"""QC-based candidate selection (paper Sec. 2.3, steps 1-5), on scores alone.

1. Rank the m candidates by pDC, best first. Ties: lower pHD first, then lower index.
2.-4. Walk down the ranking; the first candidate with ``pHD < th_up`` is selected (strictly
   below, as the paper writes it; the OoD test of :mod:`fedqc.qc.ood` fails only ``pHD > th_up``).
5. If none qualifies, the output is the mean of the probability maps of the best-pDC candidate
   (the top of the ranking) and the best-pHD candidate (lowest pHD; ties: higher pDC, then lower
   index); its argmax over classes gives the labels. Both may be the same candidate.

NaN scores rank last (a NaN pDC as -inf, a NaN pHD as +inf). The procedure needs no refinement:
it applies as is to static models (K_semi = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Selection:
    """Outcome of the selection for one case.

    Attributes:
        index: the selected candidate, or None when the fallback applies.
        fallback_pair: ``(i_best_pdc, i_best_phd)`` whose probability maps are averaged, or None.
    """

    index: int | None
    fallback_pair: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.index is None) == (self.fallback_pair is None):
            raise ValueError("a Selection holds either an index or a fallback pair, not both or neither")


def rank_by_pdc(pdc: np.ndarray, phd: np.ndarray) -> np.ndarray:
    """Candidate indices by descending pDC; ties by ascending pHD, then ascending index.

    Args:
        pdc: ``(m,)`` pDC per candidate.
        phd: ``(m,)`` pHD in mm per candidate.

    Returns:
        Integer array, a permutation of ``range(m)``.
    """
    pdc_key, phd_key = _keys(pdc, phd)
    return np.lexsort((np.arange(pdc_key.size), phd_key, -pdc_key))


def select_candidate(pdc: np.ndarray, phd: np.ndarray, th_up_phd: float, th_low_pdc: float | None = None,
                     margin: float | None = None, m_must_pass: bool = True) -> Selection:
    """Steps 1-5 of the paper's selection for one case, optionally with M kept by a margin.

    With ``margin``, candidate 0 (the best-validation model M) is kept unless another candidate's
    pDC beats its own by more than ``margin``; only then do the paper's steps choose.

    * ``m_must_pass`` (``qc.selection: guarded``): M is kept that way only while it passes both
      fences (``th_low_pdc`` required); a flagged M goes to the paper's steps.
    * not ``m_must_pass`` (``qc.selection: margin``, the default): M is kept that way whether or not
      it passes. On a flagged case every candidate is out of distribution and the ranking among
      them was measured to be noise (docs/RESULTS.md, ``benchmarks/selection_rules.py``).

    A weak QC module ranks near-equal candidates by noise; without a margin, that noise overrode
    a good M in-distribution (docs/QC.md).

    Args:
        pdc: ``(m,)`` pDC per candidate.
        phd: ``(m,)`` pHD in mm per candidate.
        th_up_phd: the upper pHD fence (Eq. 4).
        th_low_pdc: the lower pDC fence (Eq. 3), for ``m_must_pass``.
        margin: pDC margin by which another candidate must beat M; None: the paper's selection.
        m_must_pass: keep M by the margin only while it passes both fences.

    Returns:
        The :class:`Selection`.
    """
    pdc_key, phd_key = _keys(pdc, phd)
    ranking = rank_by_pdc(pdc_key, phd_key)
    if margin is not None:
        if m_must_pass and th_low_pdc is None:
            raise ValueError("guarded selection needs th_low_pdc")
        within = pdc_key[0] > -np.inf and pdc_key[ranking[0]] - pdc_key[0] <= margin
        passes = not m_must_pass or (pdc_key[0] >= th_low_pdc and phd_key[0] < th_up_phd)
        if within and passes:
            return Selection(index=0)
    for i in ranking:
        if phd_key[i] < th_up_phd:
            return Selection(index=int(i))
    best_phd = np.lexsort((np.arange(phd_key.size), -pdc_key, phd_key))[0]
    return Selection(index=None, fallback_pair=(int(ranking[0]), int(best_phd)))


def apply_selection(selection: Selection, probs):
    """The selected probability map, or the mean of the fallback pair's maps.

    Args:
        selection: from :func:`select_candidate`.
        probs: ``(m, C, ...)`` class probabilities of the m candidates (NumPy array or torch tensor).

    Returns:
        ``(C, ...)`` probabilities of the same type; ``argmax`` over axis 0 gives the labels.
    """
    if selection.index is not None:
        return probs[selection.index]
    i_pdc, i_phd = selection.fallback_pair
    return 0.5 * (probs[i_pdc] + probs[i_phd])


def _keys(pdc: np.ndarray, phd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores as 1-D float arrays with NaNs replaced so that they rank last."""
    pdc = np.asarray(pdc, dtype=np.float64)
    phd = np.asarray(phd, dtype=np.float64)
    if pdc.ndim != 1 or pdc.shape != phd.shape or pdc.size == 0:
        raise ValueError(f"pdc and phd must be non-empty (m,) arrays, got {pdc.shape} and {phd.shape}")
    return np.where(np.isnan(pdc), -np.inf, pdc), np.where(np.isnan(phd), np.inf, phd)
