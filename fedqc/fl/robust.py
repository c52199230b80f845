"""Server-side defences against poisoned or broken updates: screening and robust aggregation.

Pure numpy: no Flower, no torch. :mod:`fedqc.fl.protocol` runs every round's replies through
:func:`screen_updates` (per-update checks, then the norm-outlier rule) and combines what is left with
FedAvg (``federation.aggregation: mean``) or with :func:`robust_average` (``median`` or
``trimmed-mean``).

* Checks (:func:`fedqc.fl.aggregation.check_update`): unknown names, wrong shapes, wrong dtype kinds,
  NaN / Inf, non-positive weights.
* Norm outliers: a site whose update norm ``||w_i - w||`` (over the floating arrays it sent, against
  the global weights it started from) exceeds ``norm_factor`` times the median norm of the round is
  rejected. With ``norm_factor >= 1`` at least half the updates are at or below the limit, so the
  rule never rejects a majority. It needs three or more updates (with two, the median is their mean
  and cannot tell which one is off) and a positive median (every site returned the global
  weights unchanged); otherwise the round is not screened, and the round log says why.
* Robust aggregation: the coordinate-wise median, or the coordinate-wise trimmed mean dropping
  ``int(trim_fraction * n)`` values at each end (Flower's ``FedMedian`` / ``FedTrimmedAvg`` rule, and
  the same numbers: ``tests/fl/test_aggregation.py`` compares them). Both are unweighted: a site's
  NUM_EXAMPLES, which it reports itself, buys it no extra pull. Each name is aggregated over the sites
  that returned it; names no site returned keep their global value (FedBN's local layers, the frozen
  autoencoder). Integer buffers are rounded back to their dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedqc.fl.aggregation import Update, as_global, check_update
from fedqc.site.contract import Weights

AGGREGATIONS = ("mean", "median", "trimmed-mean")
MIN_UPDATES_FOR_NORM_CHECK = 3


@dataclass
class Screened:
    """The outcome of :func:`screen_updates`.

    Attributes:
        kept: the updates to aggregate, in their original order.
        rejected: site -> why its update was refused.
        norms: site -> update norm, for every update that passed the per-update checks.
        norm_check: what the norm rule did this round (limit used, or why it was skipped).
    """

    kept: list[Update] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    norm_check: str = ""


def update_norm(update: Update, reference: Mapping[str, np.ndarray]) -> float:
    """``||w_i - w||`` over the floating arrays of ``update`` (integer buffers are not counted)."""
    total = 0.0
    for name, value in update.weights.items():
        if np.issubdtype(value.dtype, np.floating):
            diff = np.asarray(value, dtype=np.float64) - np.asarray(reference[name], dtype=np.float64)
            total += float(np.vdot(diff, diff))
    return float(np.sqrt(total))


def norm_outliers(norms: Mapping[str, float], factor: float) -> tuple[dict[str, str], str]:
    """The sites whose norm exceeds ``factor`` times the median norm, and a note for the round log.

    Args:
        norms: site -> update norm.
        factor: the multiple of the median above which an update is rejected; 0 disables the rule.

    Returns:
        ``(rejected, note)``: site -> reason, and what the rule did (limit, or why it was skipped).
    """
    if factor <= 0:
        return {}, "off (norm_factor 0)"
    if len(norms) < MIN_UPDATES_FOR_NORM_CHECK:
        return {}, f"skipped: {len(norms)} update(s), the median rule needs {MIN_UPDATES_FOR_NORM_CHECK}"
    median = float(np.median(list(norms.values())))
    if median <= 0:
        return {}, "skipped: median update norm is 0"
    limit = factor * median
    rejected = {site: f"update norm {norm:.4g} exceeds {factor:g} x the median {median:.4g}"
                for site, norm in norms.items() if norm > limit}
    return rejected, f"limit {limit:.4g} ({factor:g} x median {median:.4g})"


def screen_updates(updates: list[Update], reference: Mapping[str, np.ndarray], norm_factor: float) -> Screened:
    """Run the per-update checks, then the norm-outlier rule over the updates that passed them.

    Args:
        updates: every update offered this round.
        reference: the global weights the sites started from.
        norm_factor: see :func:`norm_outliers`.
    """
    screened = Screened()
    sound = []
    for update in updates:
        problem = check_update(update, reference)
        if problem:
            screened.rejected[update.site] = problem
        else:
            sound.append(update)
    screened.norms = {u.site: update_norm(u, reference) for u in sound}
    outliers, screened.norm_check = norm_outliers(screened.norms, norm_factor)
    screened.rejected.update(outliers)
    screened.kept = [u for u in sound if u.site not in outliers]
    return screened


def trimmed_mean(stack: np.ndarray, fraction: float) -> np.ndarray:
    """Mean along axis 0 after dropping ``int(fraction * n)`` values at each end, per coordinate."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction!r}")
    n = stack.shape[0]
    cut = int(fraction * n)
    return np.mean(np.sort(stack, axis=0)[cut:n - cut], axis=0)


def robust_average(updates: list[Update], reference: Mapping[str, np.ndarray], method: str,
                   trim_fraction: float = 0.2) -> Weights:
    """Coordinate-wise ``median`` or ``trimmed-mean`` of the updates (unweighted).

    Args:
        updates: screened updates (see :func:`screen_updates`), at least one.
        reference: the current global weights (dtype and fallback value of every name).
        method: ``median`` or ``trimmed-mean``.
        trim_fraction: for ``trimmed-mean``, the fraction dropped at each end.

    Returns:
        New global weights with exactly the names and dtypes of ``reference``.
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    if method not in ("median", "trimmed-mean"):
        raise ValueError(f"robust aggregation must be 'median' or 'trimmed-mean', got {method!r}")
    new = {}
    for name in reference:
        values = [np.asarray(u.weights[name], dtype=np.float64) for u in updates if name in u.weights]
        if values:
            stack = np.stack(values)
            new[name] = np.median(stack, axis=0) if method == "median" else trimmed_mean(stack, trim_fraction)
    return as_global(reference, new)
