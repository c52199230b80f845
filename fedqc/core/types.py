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
