"""What a site and the coordinator exchange: task names, metric keys and the site-side protocol.

This module is the contract between the algorithm (which never imports Flower) and ``fedqc.fl``
(the only Flower importer). Everything that may leave a site is named here: model weights, and
scalar metrics whose keys are members of :class:`MetricKey`. The privacy test inspects every
message a client sends and fails on any other key or on non-scalar metric values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np

from fedqc.core.types import candidate_prefix  # noqa: F401  (part of the contract: weight names)

Scalar = bool | int | float | str
Weights = dict[str, np.ndarray]


class Task(StrEnum):
    """The work the coordinator asks of a site, one per protocol phase."""

    SUPERVISED = "supervised"  # local epochs of Eq. 1 on labelled data (segmenters)
    QC_AUTOENCODER = "qc-autoencoder"  # local epochs of the QC autoencoder loss on ground-truth masks
    REFINE = "refine"  # OoD detection + local semi-supervised refinement (Eq. 2)
    PREDICT = "predict"  # QC-based candidate selection, predictions and QC report written locally
    EVALUATE = "evaluate"  # labelled validation metrics of the given weights
    FENCES = "fences"  # labelled sites: quartiles of pDC / pHD on their validation cases (consortium fences)


class MetricKey(StrEnum):
    """Every scalar a site may report. Anything else in a reply is a privacy violation."""

    NUM_EXAMPLES = "num-examples"  # aggregation weight (slices or cases the update was computed on)
    NUM_CASES = "num-cases"  # unlabelled cases scored
    NUM_FLAGGED = "num-flagged"  # OoD-flagged cases
    NUM_LABELLED = "num-labelled"  # labelled slices contributing the supervised term
    # REFINE: the same counts per view. A site that trained one view and not the other sends only the
    # trained view's weights, and the coordinator weights each view by its own slices (not the total).
    NUM_EXAMPLES_SA = "num-examples-SA"
    NUM_LABELLED_SA = "num-labelled-SA"
    NUM_FLAGGED_SA = "num-flagged-SA"
    NUM_EXAMPLES_LA = "num-examples-LA"
    NUM_LABELLED_LA = "num-labelled-LA"
    NUM_FLAGGED_LA = "num-flagged-LA"
    TRAIN_LOSS = "train-loss"
    SUP_LOSS = "sup-loss"
    SEMI_LOSS = "semi-loss"
    VAL_LOSS = "val-loss"
    VAL_DICE = "val-dice"  # mean foreground Dice on the site's labelled validation cases
    VAL_RV_DICE = "val-rv-dice"
    ALPHA = "alpha"
    SECONDS = "seconds"  # wall time of the local work
    # privacy.dp: the site's spent epsilon (Opacus's RDP accountant over every DP-SGD step of the run
    # on its patients, at its delta), and 1 when its budget cannot hold another round (no weights sent).
    DP_EPSILON = "dp-epsilon"
    DP_BUDGET_SPENT = "dp-budget-spent"
    # FENCES (labelled sites): per view, the quartiles of the best candidate's pDC / pHD over the
    # site's validation cases and their count; the coordinator pools them into the consortium's fences.
    FENCE_SA_N = "fence-SA-n"
    FENCE_SA_PDC_Q1 = "fence-SA-pdc_q1"
    FENCE_SA_PDC_Q3 = "fence-SA-pdc_q3"
    FENCE_SA_PHD_Q1 = "fence-SA-phd_q1"
    FENCE_SA_PHD_Q3 = "fence-SA-phd_q3"
    FENCE_LA_N = "fence-LA-n"
    FENCE_LA_PDC_Q1 = "fence-LA-pdc_q1"
    FENCE_LA_PDC_Q3 = "fence-LA-pdc_q3"
    FENCE_LA_PHD_Q1 = "fence-LA-phd_q1"
    FENCE_LA_PHD_Q3 = "fence-LA-phd_q3"
    # With qc.consistency: tta, the quartiles of the best candidate's pTC too (fedqc.qc.consistency).
    FENCE_SA_PTC_Q1 = "fence-SA-ptc_q1"
    FENCE_SA_PTC_Q3 = "fence-SA-ptc_q3"
    FENCE_LA_PTC_Q1 = "fence-LA-ptc_q1"
    FENCE_LA_PTC_Q3 = "fence-LA-ptc_q3"


ALLOWED_METRIC_KEYS: frozenset[str] = frozenset(k.value for k in MetricKey)


class ConfigKey(StrEnum):
    """Keys of the flat config a site receives with every task (values are scalars)."""

    TASK = "task"  # a Task value
    SERVER_ROUND = "server-round"  # exchange counter over the whole run, 1-based
    PHASE_ROUND = "phase-round"  # round within the current phase, 1-based (k in alpha = 1/k)
    LOCAL_EPOCHS = "local-epochs"  # 0 with weights=None: return freshly initialised weights, no data read
    ALPHA = "alpha"  # weight of the semi-supervised term in Eq. 2 (REFINE)
    PROXIMAL_MU = "proximal-mu"  # FedProx: add mu/2 * ||w - w_received||^2 to the local loss; 0 = off
    NUM_CANDIDATES = "num-candidates"  # m_best segmenters carried in REFINE / PREDICT weights
    SEED = "seed"
    # REFINE / PREDICT: the consortium's fences per view, JSON {"SA": {th_low_pdc, th_up_phd, q1_pdc, ...}}
    CONSORTIUM_FENCES = "consortium-fences"
    CONTROL = "control"  # REFINE of the compute-matched control: flag nothing, Eq. 2's supervised share only
    SEMI_ONLY = "semi-only"  # REFINE, first half of a sequential round: Eq. 2's semi-supervised term alone


def fence_metric_key(view: str, stat: str) -> str:
    """The MetricKey value of one FENCES statistic (``n``, ``pdc_q1``, ...) for ``view``."""
    return MetricKey(f"fence-{view}-{stat}").value


def view_metric_key(view: str, key: MetricKey) -> str:
    """The per-view MetricKey value of a count (``num-examples``, ``num-labelled``, ``num-flagged``)."""
    return MetricKey(f"{key.value}-{view}").value


@dataclass
class SiteReply:
    """A site's answer to one task: optional weights and scalar metrics (keys from MetricKey)."""

    weights: Weights | None = None
    metrics: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - ALLOWED_METRIC_KEYS
        if unknown:
            raise ValueError(f"metrics not allowed to leave a site: {sorted(unknown)}")
        for key, value in self.metrics.items():
            if not isinstance(value, (bool, int, float, str)):
                raise TypeError(f"metric {key!r} must be a scalar, got {type(value).__name__}")


class SiteAlgo(Protocol):
    """One hospital's side of the protocol, with no knowledge of Flower (cf. MONAI's ClientAlgo).

    ``weights`` are flat name -> array dicts; names are prefixed by model, e.g. ``seg/SA/...``,
    ``ae/LA/...``. ``config`` holds flat scalars sent by the coordinator for this round
    (round number, local epochs, alpha, ...).
    """

    def run(self, task: Task, weights: Mapping[str, np.ndarray] | None,
            config: Mapping[str, Scalar]) -> SiteReply:
        ...
