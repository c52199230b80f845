"""Server-side arithmetic on flat weights: checks, weighted averaging, FedBN's split, m_best.

Pure numpy: no Flower, no torch. The protocol (:mod:`fedqc.fl.protocol`) decides what to
aggregate; this module does the sums.

FedAvg (and FedProx, whose proximal term lives in the sites' local loss) is the weighted mean
``w = sum_i n_i w_i / sum_i n_i`` over the sites that returned an update, ``n_i`` being each
site's NUM_EXAMPLES. Names a site did not return keep their previous global value, which is how
FedBN's local normalisation layers (never sent back) and the frozen autoencoder stay untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedqc.core.types import VIEWS, view_of
from fedqc.site.contract import Weights


@dataclass
class Update:
    """One site's contribution to a round.

    Attributes:
        site: the site's name (for messages).
        weights: the arrays it returned.
        num_examples: its aggregation weight.
    """

    site: str
    weights: Weights
    num_examples: float


def select(weights: Mapping[str, np.ndarray], prefix: str = "", exclude_prefix: str = "") -> Weights:
    """Names starting with ``prefix`` and not with ``exclude_prefix`` (empty: no condition)."""
    return {k: v for k, v in weights.items()
            if k.startswith(prefix) and not (exclude_prefix and k.startswith(exclude_prefix))}


def local_names(names: Iterable[str], pattern: str, shared_prefix: str = "ae/") -> set[str]:
    """FedBN: the names that stay at each site (matching ``pattern``, outside ``shared_prefix``)."""
    regex = re.compile(pattern)
    return {n for n in names if regex.search(n) and not n.startswith(shared_prefix)}


# dtype.kind -> what a returned array must be, given the global array's kind.
_KINDS = {"f": "floating", "i": "integer", "u": "integer", "b": "boolean"}


def check_update(update: Update, reference: Mapping[str, np.ndarray]) -> str | None:
    """Why an update must not be aggregated, or None when it is sound.

    An update is refused when it names an array the server does not have, when a shape differs
    from the global one, when its dtype is not of the global one's kind (a floating array must come
    back floating, at any precision; an integer buffer integer; a boolean boolean), when a floating
    array holds NaN or Inf, or when its weight is not a positive finite number.
    """
    if not np.isfinite(update.num_examples) or update.num_examples <= 0:
        return f"num-examples must be a positive number, got {update.num_examples!r}"
    for name, value in update.weights.items():
        if name not in reference:
            return f"unknown array {name!r}"
        if not isinstance(value, np.ndarray):
            return f"array {name!r} is a {type(value).__name__}, not a numpy array"
        if tuple(value.shape) != tuple(np.shape(reference[name])):
            return f"array {name!r} has shape {tuple(value.shape)}, expected {tuple(np.shape(reference[name]))}"
        expected = np.asarray(reference[name]).dtype
        kind = _KINDS.get(expected.kind, str(expected))
        if _KINDS.get(value.dtype.kind, str(value.dtype)) != kind:
            return f"array {name!r} has dtype {value.dtype}, expected {kind} (global: {expected})"
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            return f"array {name!r} holds NaN or Inf"
    return None


def weighted_average(updates: list[Update], reference: Mapping[str, np.ndarray]) -> Weights:
    """FedAvg over the sites that returned each name; other names keep their ``reference`` value.

    Args:
        updates: checked updates (see :func:`check_update`), at least one.
        reference: the current global weights (dtype and fallback value of every name).

    Returns:
        New global weights with exactly the names of ``reference``, in their original dtypes
        (integer arrays are rounded).
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {}
    for update in updates:
        for name, value in update.weights.items():
            term = np.asarray(value, dtype=np.float64) * update.num_examples
            sums[name] = sums[name] + term if name in sums else term
            totals[name] = totals.get(name, 0.0) + update.num_examples
    return as_global(reference, {name: sums[name] / totals[name] for name in sums})


def as_global(reference: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> Weights:
    """New global weights: ``new``'s values (float64) cast to ``reference``'s dtypes (integer arrays
    rounded); names not in ``new`` keep their ``reference`` value (FedBN's local layers, the frozen
    autoencoder)."""
    result: Weights = {}
    for name, old in reference.items():
        old = np.asarray(old)
        if name not in new:
            result[name] = old
            continue
        value = np.asarray(new[name], dtype=np.float64)
        result[name] = (value if np.issubdtype(old.dtype, np.floating) else np.rint(value)).astype(old.dtype)
    return result


def eq2_average(updates: list[Update], reference: Mapping[str, np.ndarray],
                labelled: Mapping[str, float]) -> Weights:
    """Refinement rounds: the update whose first-order step is that of Eq. 2 over the consortium.

    Eq. 2 is ``alpha * S + U`` with S the mean semi-supervised term over all flagged slices and U the
    mean supervised term over all labelled slices, so ``grad = alpha * sum_k F_k/F grad S_k +
    sum_k N_k/N grad U_k``. A site's update is a step on its own terms; the global step is therefore
    the F-weighted mean of the steps of sites with flagged slices (F_k = num_examples - labelled)
    plus the N-weighted mean of the steps of sites that used labelled slices only. (A site with both
    terms joins the first group: exact when its two terms come in the consortium's proportions.)

    Args:
        updates: checked updates; ``num_examples`` = slices the site used (flagged + labelled).
        reference: the global weights the sites started from.
        labelled: per site, the labelled slices it used (NUM_LABELLED; 0 or absent: none).

    Returns:
        New global weights with the names and dtypes of ``reference``.
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    flagged = {u.site: u.num_examples - float(labelled.get(u.site, 0.0)) for u in updates}
    semi = [u for u in updates if flagged[u.site] > 0]
    sup = [u for u in updates if flagged[u.site] <= 0]
    groups = [(semi, {u.site: flagged[u.site] for u in semi}), (sup, {u.site: u.num_examples for u in sup})]
    step: dict[str, np.ndarray] = {}
    for members, weight in groups:
        total = sum(weight.values())
        for update in members:
            for name, value in update.weights.items():
                term = (np.asarray(value, dtype=np.float64) - np.asarray(reference[name], dtype=np.float64)) \
                    * (weight[update.site] / total)
                step[name] = step[name] + term if name in step else term
    return as_global(reference, {name: np.asarray(reference[name], dtype=np.float64) + d for name, d in step.items()})


@dataclass
class ViewCounts:
    """A site's counts for one view of a refinement round: the slices its update of that view used,
    and how many of them were labelled."""

    num_examples: float
    num_labelled: float = 0.0


def split_by_view(updates: list[Update], counts: Mapping[str, Mapping[str, ViewCounts]]
                  ) -> list[tuple[str | None, list[Update], dict[str, float]]]:
    """Refinement: each site's update cut into one update per view, each weighted by that view's own
    slices, so that a view is averaged over the sites that trained it, in the proportions of its data.

    A site's update holds only the views it trained (a view with no flagged and no labelled slice is
    not sent); weighting a view by the site's total slices would give one view's data the pull of the
    other's. Names outside any view stay in a group of their own, weighted by the whole count.

    Args:
        updates: checked updates.
        counts: per site, per view, its counts (:class:`ViewCounts`); every site of ``updates`` must have them.

    Returns:
        ``(view, updates, labelled slices by site)`` per view some site trained, views in a stable order.
    """
    groups: dict[str | None, tuple[list[Update], dict[str, float]]] = {}
    for update in updates:
        parts: dict[str | None, Weights] = {}
        for name, value in update.weights.items():
            parts.setdefault(view_of(name), {})[name] = value
        for view, weights in parts.items():
            site_counts = counts[update.site]
            if view is None:
                n, labelled = update.num_examples, sum(c.num_labelled for c in site_counts.values())
            elif view in site_counts:
                n, labelled = site_counts[view].num_examples, site_counts[view].num_labelled
            else:
                raise ValueError(f"site {update.site} sent weights of view {view} without its counts")
            if n <= 0:
                raise ValueError(f"site {update.site} sent weights of view {view} with num-examples {n}")
            members, by_site = groups.setdefault(view, ([], {}))
            members.append(Update(update.site, weights, float(n)))
            by_site[update.site] = float(labelled)
    order = sorted(groups, key=lambda v: (v is None, str(v)))
    return [(view, *groups[view]) for view in order]


def name_totals(names: Iterable[str], counts: list[Mapping[str, ViewCounts]], total: float) -> dict[str, float]:
    """Secure aggregation's divisors: per name, the sum of the weights its masked terms carry.

    ``counts``: the per-view counts of every site that contributed (weight > 0). When each of them
    reported per-view counts (REFINE), a view's names are divided by that view's slices over the
    consortium (0: nobody trained it, the name keeps its global value); otherwise by ``total``.
    """
    per_view: dict[str, float] = {}
    if counts and all(counts):
        per_view = {view: sum(c[view].num_examples for c in counts if view in c) for view in VIEWS}
    return {name: per_view.get(view_of(name), total) if per_view else total for name in names}


_STATISTICS = re.compile(r"running_mean$|running_var$|num_batches_tracked$")


def server_step(start: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray], lr: float) -> Weights:
    """A server learning rate on a round's aggregated step: ``start + lr * (averaged - start)``.

    The step is scaled on floating parameters only; normalisation statistics (running mean and
    variance, batch counters) keep the averaged value (an extrapolated variance could turn negative).
    ``lr`` 1 returns ``averaged``; with ``n`` sites contributing, ``lr = n`` turns their mean step into
    the sum of their steps (to first order, what taking them one after the other would give).
    """
    out: Weights = {}
    for name, value in averaged.items():
        value = np.asarray(value)
        if lr == 1.0 or name not in start or not np.issubdtype(value.dtype, np.floating) or _STATISTICS.search(name):
            out[name] = value
            continue
        base = np.asarray(start[name], dtype=np.float64)
        out[name] = (base + lr * (value.astype(np.float64) - base)).astype(value.dtype)
    return out


def weighted_mean(values: Iterable[tuple[float, float]]) -> float | None:
    """Mean of ``(value, weight)`` pairs; None when the weights sum to zero."""
    pairs = [(float(v), float(w)) for v, w in values]
    total = sum(w for _, w in pairs)
    if total <= 0:
        return None
    return sum(v * w for v, w in pairs) / total


@dataclass
class BestRounds:
    """The m_best global checkpoints by federated validation score (higher is better).

    Rounds are added as they finish (unscored) and scored when their validation arrives (one
    round later, inside the next training reply). :meth:`keep` lists the rounds whose checkpoint
    files must stay: the m best scored, plus any round still waiting for its score.
    """

    m_best: int
    scores: dict[int, float | None] = field(default_factory=dict)

    def add(self, round_: int) -> None:
        """A round finished; its score is not known yet."""
        self.scores.setdefault(round_, None)

    def score(self, round_: int, value: float | None) -> None:
        """Record a round's federated validation score (None: no site reported one)."""
        self.scores[round_] = value

    def best(self) -> list[int]:
        """The m best rounds, best first; unscored rounds rank after scored ones, latest first."""
        ranked = sorted(self.scores, key=lambda r: (self.scores[r] is not None, self.scores[r] or 0.0, r), reverse=True)
        return ranked[: self.m_best]

    def keep(self) -> set[int]:
        """Rounds whose checkpoint must stay on disk."""
        waiting = {r for r, s in self.scores.items() if s is None and r == max(self.scores)}
        return set(self.best()) | waiting

    def to_json(self) -> dict:
        """A JSON-able view (round numbers as strings)."""
        return {"m_best": self.m_best, "scores": {str(k): v for k, v in self.scores.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> BestRounds:
        """Inverse of :meth:`to_json`."""
        return cls(int(data["m_best"]), {int(k): v for k, v in data["scores"].items()})
