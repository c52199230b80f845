"""The thorax around the heart, as signed-distance paint layers in world coordinates.

Subcutaneous fat, chest-wall and paraspinal muscle, lungs above a two-domed diaphragm, liver
(right) and stomach/spleen (left) below it, spine with marrow and spinal canal, the posterior
mediastinum and the descending aorta. Painted first; the heart (:mod:`.heart`) is painted over
it, so the lungs hug whatever the heart does not occupy.
"""

from __future__ import annotations

import numpy as np

from fedqc.core.types import FloatArray
from fedqc.data.simulator.anatomy import BodyShape
from fedqc.data.simulator.heart import Layer
from fedqc.data.simulator.shapes import ellipsoid_sdf, wave_field
from fedqc.data.simulator.tissue import Tissue

_DOME_RADIUS_MM = 120.0


def diaphragm_z(x: FloatArray, y: FloatArray, body: BodyShape) -> FloatArray:
    """Height (world z, mm) of the diaphragm under each ``(x, y)``: the higher of two domes."""
    cx, cy = body.centre_xy_mm
    left = body.dome_z_mm[0] - ((x - (cx - 70.0)) ** 2 + (y - cy) ** 2) / (2 * _DOME_RADIUS_MM)
    right = body.dome_z_mm[1] - ((x - (cx + 60.0)) ** 2 + (y - cy) ** 2) / (2 * _DOME_RADIUS_MM)
    return np.maximum(left, right)


def body_layers(x: FloatArray, y: FloatArray, z: FloatArray, body: BodyShape, waves: np.ndarray) -> list[Layer]:
    """Paint layers (back to front) of the thorax at world points ``(x, y, z)``.

    Args:
        x, y, z: world coordinates (mm).
        body: the thorax.
        waves: a smooth random field (:func:`shapes.random_waves`) that makes layer thicknesses irregular.
    """
    f32 = np.float32
    cx, cy = body.centre_xy_mm
    wobble = wave_field(x, y, z, waves)
    d_skin = ellipsoid_sdf(x - f32(cx), y - f32(cy), None, body.semi_axes_mm) + 3.0 * wobble
    d_muscle = d_skin + f32(body.fat_mm) * (1.0 + 0.35 * wobble)
    # Chest-wall muscle, much thicker at the back (paraspinal muscles).
    back = np.clip((f32(cy) - y) / f32(body.semi_axes_mm[1]), 0.0, 1.0)
    d_inner = d_muscle + f32(body.muscle_mm) * (1.0 - 0.3 * wobble) * (1.0 + 3.5 * back * back)
    below = z - diaphragm_z(x, y, body)
    d_lung = np.maximum(d_inner, -below)
    d_abdomen = np.maximum(d_inner, below)
    d_liver = np.maximum(d_abdomen, f32(cx - 15.0) - x + 0.3 * (y - f32(cy)))

    sx, sy = body.spine_xy_mm
    d_mediastinum = ellipsoid_sdf(x - f32(sx - 10), y - f32(sy + 30), None, (17.0, 20.0))
    d_vertebra = ellipsoid_sdf(x - f32(sx), y - f32(sy), None, (18.0, 16.0))
    d_canal = ellipsoid_sdf(x - f32(sx), y - f32(sy - 29), None, (8.0, 7.0))
    ax, ay = body.aorta_xy_mm
    d_aorta = np.sqrt((x - f32(ax) - 0.06 * z) ** 2 + (y - f32(ay)) ** 2) - f32(body.aorta_radius_mm)
    return [
        (d_skin, Tissue.FAT, False),
        (d_muscle, Tissue.MUSCLE, False),
        (d_abdomen, Tissue.ABDOMEN, False),
        (d_liver, Tissue.LIVER, False),
        (d_lung, Tissue.LUNG, False),
        (d_mediastinum, Tissue.FAT, False),
        (d_vertebra + 2.0, Tissue.BONE, False),
        (d_vertebra, Tissue.MARROW, False),
        (d_canal - 1.5, Tissue.BONE, False),
        (d_canal, Tissue.CSF, False),
        (d_aorta, Tissue.VESSEL, False),
    ]
