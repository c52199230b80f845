"""Type aliases and constants shared across fedqc (M&Ms-2 conventions)."""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

import numpy as np
import numpy.typing as npt

View = Literal["SA", "LA"]
Phase = Literal["ED", "ES"]
VIEWS: tuple[View, ...] = ("SA", "LA")
PHASES: tuple[Phase, ...] = ("ED", "ES")

FloatArray = npt.NDArray[np.floating]
LabelArray = npt.NDArray[np.uint8]


class Label(IntEnum):
    """M&Ms-2 label values, identical in SA and LA."""

    BACKGROUND = 0
    LV = 1
    MYO = 2
    RV = 3


NUM_CLASSES = 4
CLASS_NAMES: dict[int, str] = {1: "LV", 2: "MYO", 3: "RV"}


def candidate_prefix(index: int) -> str:
    """Name prefix of the ``index``-th m_best segmenter in REFINE / PREDICT weights.

    Those weights hold ``m0/seg/SA/...``, ``m1/seg/SA/...`` (one copy per candidate, best first)
    plus the frozen ``ae/...`` autoencoder; SUPERVISED and EVALUATE weights hold ``seg/...`` only,
    QC_AUTOENCODER weights ``ae/...`` only.
    """
    return f"m{index}/"


def view_of(name: str) -> View | None:
    """The view a weight name belongs to (``m0/seg/SA/...``, ``seg/LA/...``, ``ae/SA/...``), or None."""
    return next((part for part in name.split("/")[:-1] if part in VIEWS), None)  # type: ignore[return-value]


# The compute-matched control's candidates in a federated run's final weights: ``ctl/m<i>/seg/...``.
CONTROL_PREFIX = "ctl/"
