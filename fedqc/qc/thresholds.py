"""OoD thresholds: Tukey fences on the pseudo-metrics (paper Eq. 3 and 4).

    th_low = Q1(pDC) - factor * (Q3(pDC) - Q1(pDC))      (Eq. 3, factor 1.5)
    th_up  = Q3(pHD) + factor * (Q3(pHD) - Q1(pHD))      (Eq. 4)

and, with ``qc.consistency: tta``, a lower fence of the same form on pTC (fedqc.qc.consistency).

Quartiles are ``numpy.percentile(values, [25, 75])`` with its default ``method="linear"``
(Hyndman & Fan type 7: the q-th quartile sits at rank ``(n - 1) * q / 4`` of the sorted values,
interpolated linearly). Non-finite values are dropped before fitting and counted in
``Thresholds.n_dropped``; each of the two sets needs at least :data:`MIN_VALUES` finite values.

Fitted thresholds are saved as a small JSON file (written atomically) so that a site's run can be
read back, compared and resumed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from fedqc.core.errors import DataError, FedqcError
from fedqc.core.io import atomic_write

MIN_VALUES = 4  # fewer finite values leave the quartiles meaningless
FORMAT = "fedqc-thresholds/1"
QUANTILE_METHOD = "numpy.percentile linear (Hyndman-Fan type 7)"


class ThresholdFitError(FedqcError, ValueError):
    """Too few usable pseudo-metric values to fit the fences; the message says how many."""


@dataclass(frozen=True)
class Thresholds:
    """Tukey fences on pDC and pHD, with the quartiles they came from.

    Attributes:
        th_low_pdc: lower fence on pDC (Eq. 3); a candidate fails when ``pdc < th_low_pdc``.
        th_up_phd: upper fence on pHD in mm (Eq. 4); a candidate fails when ``phd > th_up_phd``.
        q1_pdc, q3_pdc: first and third quartiles of the pDC values.
        q1_phd, q3_phd: first and third quartiles of the pHD values (mm).
        factor: the fence factor (1.5 in the paper).
        n_cases: number of cases given to the fit, before dropping non-finite values.
        source: what the values came from, e.g. ``"unlabelled"`` or ``"site-2/SA/ED"``.
        n_dropped: non-finite values dropped (pDC and pHD counted together).
        requested: the fence source the config asked for (:func:`fedqc.qc.fences.choose_fences`),
            when it differs from ``source`` the ``note`` says why.
        note: why another source was used, empty when the requested one was.
        th_low_ptc, q1_ptc, q3_ptc: the lower fence on pTC and its quartiles (``qc.consistency``);
            None when the fences were fitted without pTC (a candidate is then not judged on it).
    """

    th_low_pdc: float
    th_up_phd: float
    q1_pdc: float
    q3_pdc: float
    q1_phd: float
    q3_phd: float
    factor: float
    n_cases: int
    source: str
    n_dropped: int = 0
    requested: str = ""
    note: str = ""
    th_low_ptc: float | None = None
    q1_ptc: float | None = None
    q3_ptc: float | None = None

    def to_json(self, path: str | Path) -> None:
        """Write the thresholds as readable JSON, atomically (a temporary file then a rename).

        Args:
            path: destination file; its folder must exist.
        """
        path = Path(path)
        record = {"format": FORMAT, "quantile_method": QUANTILE_METHOD, **asdict(self)}
        atomic_write(path, json.dumps(record, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Thresholds:
        """Read thresholds written by :meth:`to_json`.

        Args:
            path: the JSON file.

        Raises:
            DataError: the file is missing, not JSON, of another format or lacks a field.
        """
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise DataError(path, f"cannot read thresholds: {err}") from err
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise DataError(path, f"not a thresholds file (expected format {FORMAT!r})")
        names = [f.name for f in fields(cls)]
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        missing = [name for name in names if name not in record and name not in optional]
        if missing:
            raise DataError(path, f"thresholds file lacks {missing}")
        return cls(**{name: record[name] for name in names if name in record})


def fit_tukey_thresholds(
    pdc_values: np.ndarray,
    phd_values: np.ndarray,
    factor: float = 1.5,
    source: str = "unlabelled",
    ptc_values: np.ndarray | None = None,
) -> Thresholds:
    """Fit Eq. 3 and 4 on one value per case (and Eq. 3's form on pTC when given).

    Args:
        pdc_values: pDC of each case (1-D).
        phd_values: pHD of each case in mm (1-D, same length).
        factor: fence factor, 1.5 in the paper.
        source: label stored with the result.
        ptc_values: pTC of each case (1-D, same length), or None.

    Returns:
        The fitted :class:`Thresholds`.

    Raises:
        ThresholdFitError: fewer than :data:`MIN_VALUES` finite values in either set.
        ValueError: the inputs are not 1-D arrays of equal length, or ``factor`` is negative.
    """
    pdc = np.asarray(pdc_values, dtype=np.float64)
    phd = np.asarray(phd_values, dtype=np.float64)
    if pdc.ndim != 1 or pdc.shape != phd.shape:
        raise ValueError(f"pdc and phd must be 1-D of equal length, got {pdc.shape} and {phd.shape}")
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"factor must be a finite number >= 0, got {factor}")
    pdc_ok, phd_ok = pdc[np.isfinite(pdc)], phd[np.isfinite(phd)]
    checked = [("pDC", pdc_ok), ("pHD", phd_ok)]
    ptc_extra: dict[str, float] = {}
    if ptc_values is not None:
        ptc = np.asarray(ptc_values, dtype=np.float64)
        if ptc.shape != pdc.shape:
            raise ValueError(f"ptc must have pdc's shape {pdc.shape}, got {ptc.shape}")
        checked.append(("pTC", ptc[np.isfinite(ptc)]))
    for name, kept in checked:
        if kept.size < MIN_VALUES:
            raise ThresholdFitError(
                f"{source}: {kept.size} finite {name} values of {pdc.size} cases; "
                f"the Tukey fences need at least {MIN_VALUES}"
            )
    if ptc_values is not None:
        q1_ptc, q3_ptc = np.percentile(checked[2][1], [25, 75])
        ptc_extra = {"th_low_ptc": float(q1_ptc - factor * (q3_ptc - q1_ptc)), "q1_ptc": float(q1_ptc),
                     "q3_ptc": float(q3_ptc)}
    q1_pdc, q3_pdc = np.percentile(pdc_ok, [25, 75])
    q1_phd, q3_phd = np.percentile(phd_ok, [25, 75])
    return Thresholds(
        th_low_pdc=float(q1_pdc - factor * (q3_pdc - q1_pdc)),
        th_up_phd=float(q3_phd + factor * (q3_phd - q1_phd)),
        q1_pdc=float(q1_pdc),
        q3_pdc=float(q3_pdc),
        q1_phd=float(q1_phd),
        q3_phd=float(q3_phd),
        factor=float(factor),
        n_cases=int(pdc.size),
        source=source,
        n_dropped=int(pdc.size - pdc_ok.size + phd.size - phd_ok.size),
        **ptc_extra,
    )


def fit_from_candidates(
    pdc: np.ndarray,
    phd: np.ndarray,
    factor: float = 1.5,
    source: str = "unlabelled",
    ptc: np.ndarray | None = None,
) -> Thresholds:
    """Fit the fences on each case's best candidate, as the reference implementation does.

    Each case contributes its best pDC (maximum over the m candidates) and, independently, its
    best pHD (minimum) and best pTC (maximum); non-finite candidate values are ignored, and a case
    with none finite counts as dropped. With ``m == 1`` this is :func:`fit_tukey_thresholds`.

    Args:
        pdc: ``(n_cases, m)`` pDC of each candidate prediction.
        phd: ``(n_cases, m)`` pHD in mm, same shape.
        factor: fence factor.
        source: label stored with the result.
        ptc: ``(n_cases, m)`` pTC, same shape, or None.

    Returns:
        The fitted :class:`Thresholds` (``n_cases`` counts cases, not candidates).
    """
    pdc = np.asarray(pdc, dtype=np.float64)
    phd = np.asarray(phd, dtype=np.float64)
    if pdc.ndim != 2 or pdc.shape != phd.shape:
        raise ValueError(f"pdc and phd must be (n_cases, m) of equal shape, got {pdc.shape} and {phd.shape}")
    best_pdc = np.where(np.isfinite(pdc), pdc, -np.inf).max(axis=1, initial=-np.inf)
    best_phd = np.where(np.isfinite(phd), phd, np.inf).min(axis=1, initial=np.inf)
    best_ptc = None
    if ptc is not None:
        ptc = np.asarray(ptc, dtype=np.float64)
        if ptc.shape != pdc.shape:
            raise ValueError(f"ptc must have pdc's shape {pdc.shape}, got {ptc.shape}")
        best_ptc = np.where(np.isfinite(ptc), ptc, -np.inf).max(axis=1, initial=-np.inf)
    return fit_tukey_thresholds(best_pdc, best_phd, factor, source, best_ptc)


QUARTILES = ("pdc_q1", "pdc_q3", "phd_q1", "phd_q3")
PTC_QUARTILES = ("ptc_q1", "ptc_q3")  # sent only when the site scores pTC (qc.consistency)


def fence_quartiles(fences: Thresholds) -> dict[str, float]:
    """What a labelled site reports for the consortium's fences: four quartiles (six with pTC) and its
    case count."""
    out = {"pdc_q1": fences.q1_pdc, "pdc_q3": fences.q3_pdc, "phd_q1": fences.q1_phd, "phd_q3": fences.q3_phd,
           "n": fences.n_cases}
    if fences.q1_ptc is not None and fences.q3_ptc is not None:
        out.update({"ptc_q1": fences.q1_ptc, "ptc_q3": fences.q3_ptc})
    return out


def pooled_fences(per_site: Sequence[Mapping[str, float]], factor: float) -> Thresholds:
    """The consortium's fences from the labelled sites' quartiles, each weighted by its case count.

    The exact pooled quartiles would need every site's per-case scores, which never leave a site;
    the count-weighted mean of the sites' quartiles is what the coordinator can compute from
    scalars. It equals the pooled quartile when the sites' distributions agree, and is pulled
    toward the larger site otherwise (docs/FEDERATION.md).

    Raises:
        ThresholdFitError: fewer than :data:`fedqc.qc.thresholds.MIN_VALUES` cases in all.
    """
    rows = [r for r in per_site if r.get("n", 0) > 0]
    total = sum(r["n"] for r in rows)
    if total < MIN_VALUES:
        raise ThresholdFitError(f"consortium: {total} labelled validation cases; the fences need at least {MIN_VALUES}")
    q = {k: sum(r[k] * r["n"] for r in rows) / total for k in QUARTILES}
    ptc: dict[str, float] = {}
    if all(k in r for r in rows for k in PTC_QUARTILES):  # pTC pooled only when every site scored it
        q1, q3 = (sum(r[k] * r["n"] for r in rows) / total for k in PTC_QUARTILES)
        ptc = {"th_low_ptc": q1 - factor * (q3 - q1), "q1_ptc": q1, "q3_ptc": q3}
    return Thresholds(th_low_pdc=q["pdc_q1"] - factor * (q["pdc_q3"] - q["pdc_q1"]),
                      th_up_phd=q["phd_q3"] + factor * (q["phd_q3"] - q["phd_q1"]),
                      q1_pdc=q["pdc_q1"], q3_pdc=q["pdc_q3"], q1_phd=q["phd_q1"], q3_phd=q["phd_q3"],
                      factor=float(factor), n_cases=int(total), source=f"consortium ({len(rows)} sites)", **ptc)
