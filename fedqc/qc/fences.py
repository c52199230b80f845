"""Which Tukey fences flag a site's cases: the one fence-choice policy of every path.

``fedqc refine``, ``fedqc predict``, the ablation and a federated site all ask
:func:`choose_fences` with the config's ``qc.threshold_source`` and what they have:

* ``consortium``: fences of in-distribution behaviour, from the labelled sites' validation cases
  under the current candidates: fitted on the pooled cases in ``fedqc train``; in the federation
  pooled by the coordinator from each labelled site's quartiles (:func:`pooled_fences`) and sent
  with the refine and predict tasks;
* ``unlabelled``: fences fitted on the cases themselves (the paper's own-pool fences).

The requested source is used when it is available and has at least
:data:`fedqc.qc.thresholds.MIN_VALUES` cases; otherwise the other one, and the fences record what
was asked for and why it was not used (``requested`` / ``note`` in their JSON, a warning in the
log). With neither, :class:`ThresholdFitError` names both reasons. Providers are callables so
that nothing is scored that is not used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from fedqc.config import Config
from fedqc.core.errors import ConfigError
from fedqc.data.site import PreparedCase
from fedqc.qc.scoring import CaseScores, score_cases
from fedqc.qc.thresholds import ThresholdFitError, Thresholds, fit_from_candidates

SOURCES = ("consortium", "unlabelled")
ALIASES = {"labelled-val": "consortium"}  # the old name
Provider = Callable[[], Thresholds] | None
logger = logging.getLogger("fedqc.qc")


def fences_from_scores(scores: CaseScores, factor: float, source: str) -> Thresholds:
    """Eq. 3 / 4 over a scoring pass (each case's best candidate, as the reference)."""
    return fit_from_candidates(scores.pdc, scores.phd, factor=factor, source=source, ptc=scores.ptc)


def fit_fences(config: Config, models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
               cases: Sequence[PreparedCase], source: str, device: torch.device) -> Thresholds:
    """Score ``cases`` with every candidate and fit the fences on them."""
    scores = score_cases(models, autoencoder, cases, config.qc, device)
    return fences_from_scores(scores, config.qc.tukey_factor, source)


def choose_fences(requested: str, *, labelled_val: Provider, unlabelled: Provider, where: str) -> Thresholds:
    """The fences for one site and view under the single policy above.

    Args:
        requested: ``qc.threshold_source``.
        labelled_val: gives the consortium's fences (fitted on, or read from, labelled validation
            cases, or pooled by the coordinator); None when there are none here.
        unlabelled: fits the own-pool fences; None when there are no such cases here.
        where: the site and view, for messages.

    Raises:
        ConfigError: an unknown source.
        ThresholdFitError: no source could give fences.
    """
    requested = ALIASES.get(requested, requested)
    if requested not in SOURCES:
        raise ConfigError("qc.threshold_source", f"unknown '{requested}'; use one of {list(SOURCES)}")
    providers = {"consortium": labelled_val, "unlabelled": unlabelled}
    order = [requested] + [s for s in SOURCES if s != requested]
    reasons = []
    for source in order:
        provider = providers[source]
        if provider is None:
            reasons.append(f"no {'consortium (labelled validation)' if source == 'consortium' else 'unlabelled'} "
                           "cases")
            continue
        try:
            fences = provider()
        except ThresholdFitError as exc:
            reasons.append(str(exc))
            continue
        note = "" if source == requested else f"{requested} fences unavailable ({reasons[0]}); used {source}"
        if note:
            logger.warning("%s: %s", where, note)
        return _marked(fences, requested, note)
    raise ThresholdFitError(f"{where}: no fences: " + "; ".join(f"{s}: {r}" for s, r in zip(order, reasons)))


def _marked(fences: Thresholds, requested: str, note: str) -> Thresholds:
    import dataclasses

    return dataclasses.replace(fences, requested=requested, note=note)
