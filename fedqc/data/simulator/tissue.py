"""Tissue classes of the simulated thorax and their cine-MRI appearance.

Intensities are relative to ventricular blood (1.0) in a 1.5 T balanced SSFP cine, the sequence
M&Ms-2 images come from: blood and fat bright, myocardium, liver and skeletal muscle
intermediate-dark, lungs dark with small bright vessels. Only the ventricles carry labels; the
other classes are there because a segmenter has to learn to ignore them (atria and great vessels
look exactly like ventricular blood, epicardial fat is as bright as blood next to the thin RV
free wall, liver sits against the inferior wall).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum


class Tissue(IntEnum):
    """What a voxel of the simulated thorax is made of."""

    AIR = 0
    LUNG = 1
    FAT = 2
    MUSCLE = 3
    LIVER = 4
    ABDOMEN = 5
    MARROW = 6
    CSF = 7
    BLOOD = 8
    VESSEL = 9
    MYOCARDIUM = 10
    BONE = 11


TISSUE_NAMES: tuple[str, ...] = tuple(t.name.lower() for t in Tissue)

#: 1.5 T bSSFP cine: the appearance every centre's protocol is a departure from.
REFERENCE_CONTRAST: Mapping[str, float] = {
    "air": 0.0,
    "lung": 0.06,
    "fat": 0.82,
    "muscle": 0.24,
    "liver": 0.32,
    "abdomen": 0.38,
    "marrow": 0.52,
    "csf": 0.9,
    "blood": 1.0,
    "vessel": 0.93,
    "myocardium": 0.28,
    "bone": 0.05,
}

#: Relative amplitude of each tissue's smooth texture (flow, fat septa, liver vessels, ...).
TEXTURE_AMPLITUDE: Mapping[str, float] = {
    "air": 0.0,
    "lung": 0.5,
    "fat": 0.08,
    "muscle": 0.06,
    "liver": 0.07,
    "abdomen": 0.25,
    "marrow": 0.1,
    "csf": 0.05,
    "blood": 0.07,
    "vessel": 0.08,
    "myocardium": 0.06,
    "bone": 0.0,
}


def contrast_vector(table: Mapping[str, float]) -> list[float]:
    """A contrast table as a list indexed by :class:`Tissue` value.

    Raises:
        KeyError: naming the first tissue the table lacks.
    """
    return [float(table[name]) for name in TISSUE_NAMES]


def blend_contrast(reference: Mapping[str, float], target: Mapping[str, float],
                   weight: float) -> dict[str, float]:
    """``reference`` moved toward ``target`` by ``weight`` (0 keeps it, 1 reaches the target).

    Weights above 1 extrapolate; intensities are kept non-negative.
    """
    return {name: max(0.0, reference[name] + weight * (target[name] - reference[name])) for name in TISSUE_NAMES}
