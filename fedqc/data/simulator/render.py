"""Render one slice of a subject: the noiseless magnetisation image and its label map.

Layers are painted back to front with anti-aliased edges (in-plane partial volume); around the
heart the slice is rendered at several depths across its thickness and averaged (through-plane
partial volume, which is what blurs the apex and the valve planes). Labels come from the slice's
centre plane at pixel centres, like a careful annotator's, so they stay crisp where the image is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from fedqc.core.types import FloatArray, Label, LabelArray
from fedqc.data.simulator.anatomy import SubjectAnatomy
from fedqc.data.simulator.body import body_layers
from fedqc.data.simulator.heart import HeartLayers, Layer, heart_layers
from fedqc.data.simulator.planes import SlicePlane
from fedqc.data.simulator.shapes import inside_fraction, wave_field
from fedqc.data.simulator.tissue import TEXTURE_AMPLITUDE, TISSUE_NAMES, Tissue

#: Half-size of the square around the heart that gets the detailed, multi-depth rendering.
HEART_HALF_SIZE_MM = 90.0
#: Off-centre depths are rendered where the centre plane is within this distance of the heart.
_DEPTH_MARGIN_MM = 12.0


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> FloatArray:
    """Zero-mean, unit-variance Gaussian noise smoothed over about ``sigma_px`` pixels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
    return (field - field.mean()) / (field.std() + np.float32(1e-6))


def tissue_appearance(contrast: Sequence[float], texture: FloatArray, vessels: FloatArray
                      ) -> list[FloatArray | float]:
    """Per-tissue intensity (scalar or per-pixel) for one slice: contrast times texture."""
    looks: list[FloatArray | float] = []
    for tissue, name in zip(Tissue, TISSUE_NAMES, strict=True):
        base = np.float32(contrast[tissue])
        amp = TEXTURE_AMPLITUDE[name]
        look = base * (1.0 + np.float32(amp) * texture) if amp else base
        if tissue in (Tissue.LUNG, Tissue.LIVER):  # pulmonary and hepatic vessels: small bright dots
            look = look + vessels * np.float32(0.7 * contrast[Tissue.VESSEL] - 0.5 * contrast[tissue])
        looks.append(look)
    return looks


def _paint(image: FloatArray, layers: Sequence[Layer], looks: Sequence[FloatArray | float],
           pixel_mm: float, box: tuple[slice, slice] | None = None) -> None:
    for values, tissue, is_fraction in layers:
        frac = values if is_fraction else inside_fraction(values, pixel_mm)
        look = looks[tissue]
        if box is not None and not np.isscalar(look):
            look = look[box]  # type: ignore[index]
        image += frac * (look - image)


def _heart_box(anatomy: SubjectAnatomy, plane: SlicePlane) -> tuple[slice, slice] | None:
    origin, rotation = anatomy.frame("ED")
    centre = origin - 0.35 * anatomy.ed.lv_length_mm * rotation[:, 2] + 12.0 * rotation[:, 0]
    ci, cj = plane.pixel_of(centre)
    hi, hj = HEART_HALF_SIZE_MM / plane.spacing_mm[0], HEART_HALF_SIZE_MM / plane.spacing_mm[1]
    box = (slice(max(0, int(ci - hi)), min(plane.shape[0], int(ci + hi) + 1)),
           slice(max(0, int(cj - hj)), min(plane.shape[1], int(cj + hj) + 1)))
    return None if box[0].start >= box[0].stop or box[1].start >= box[1].stop else box


def _heart_points(anatomy: SubjectAnatomy, phase: str, plane: SlicePlane, box: tuple[slice, slice],
                  offsets_mm: Sequence[float]) -> list[tuple[FloatArray, FloatArray, FloatArray]]:
    """Deformed heart-frame coordinates of the box's pixels at each depth offset.

    The smooth deformation (wavelengths of many cm) is evaluated once, at the first depth.
    """
    origin, rotation = anatomy.frame(phase)
    r = rotation.astype(np.float32)
    out = []
    displacement = None
    for offset in offsets_mm:
        x, y, z = plane.points(offset, box)
        rel = (x - np.float32(origin[0]), y - np.float32(origin[1]), z - np.float32(origin[2]))
        u, v, w = (rel[0] * r[0, k] + rel[1] * r[1, k] + rel[2] * r[2, k] for k in range(3))
        if displacement is None:
            displacement = [wave_field(u, v, w, waves) for waves in anatomy.deform_waves]
        out.append((u + displacement[0], v + displacement[1], w + displacement[2]))
    return out


def plane_labels(anatomy: SubjectAnatomy, plane: SlicePlane, phase: str) -> LabelArray:
    """The labels :func:`render_plane` gives ``plane`` at ``phase``, without rendering the image.

    Deterministic (no random draws), so a plan can be checked before it is acquired.
    """
    labels = np.zeros(plane.shape, dtype=np.uint8)
    box = _heart_box(anatomy, plane)
    if box is not None:
        (points,) = _heart_points(anatomy, phase, plane, box, [0.0])
        labels[box] = _labels(heart_layers(*points, anatomy, phase, float(np.mean(plane.spacing_mm))))
    return labels


def render_plane(anatomy: SubjectAnatomy, plane: SlicePlane, contrast: Sequence[float], rng: np.random.Generator,
                 phases: Sequence[str] = ("ED", "ES"), depths: int = 3
                 ) -> dict[str, tuple[FloatArray, LabelArray, FloatArray]]:
    """Render a slice at each phase: noiseless image, labels, and where the heart moves.

    The thorax is static, so it is rendered once and shared by the phases.

    Args:
        anatomy: the subject.
        plane: the slice.
        contrast: intensity per :class:`Tissue` value (see :func:`tissue.contrast_vector`).
        rng: random generator for the per-slice textures.
        phases: the phases to render.
        depths: sub-slices (odd) averaged across the slice thickness around the heart.

    Returns:
        ``{phase: (image, labels, motion_weight)}``: image float32 of ``plane.shape``, labels uint8,
        motion weight in [0, 1] (1 on and near the heart).
    """
    if depths < 1 or depths % 2 == 0:
        raise ValueError(f"depths must be odd and positive (the centre plane gives the labels), got {depths}")
    pixel_mm = float(np.mean(plane.spacing_mm))
    texture = smooth_noise(rng, plane.shape, 4.0 / pixel_mm)
    fine = smooth_noise(rng, plane.shape, 1.1 / pixel_mm + 0.4)
    vessels = np.clip((fine - 2.6) * 1.5, 0.0, 1.0)
    looks = tissue_appearance(contrast, texture, vessels)

    thorax = np.zeros(plane.shape, dtype=np.float32)
    _paint(thorax, body_layers(*plane.points(), anatomy.body, anatomy.body_waves), looks, pixel_mm)
    box = _heart_box(anatomy, plane)
    half = 0.5 * plane.thickness_mm
    offsets = sorted(np.linspace(-half, half, 2 * depths + 1)[1::2].tolist(), key=abs)  # centre first
    out = {}
    for phase in phases:
        image = thorax.copy()
        labels = np.zeros(plane.shape, dtype=np.uint8)
        motion = np.zeros(plane.shape, dtype=np.float32)
        if box is not None:
            (centre_points,) = _heart_points(anatomy, phase, plane, box, offsets[:1])
            heart = heart_layers(*centre_points, anatomy, phase, pixel_mm)
            labels[box] = _labels(heart)
            motion[box] = np.clip(1.0 - np.minimum(heart.epi_sdf, heart.rv_sdf) / 40.0, 0.0, 1.0)
            centre_image = thorax[box].copy()
            _paint(centre_image, heart.layers, looks, pixel_mm, box)
            accum = centre_image * np.float32(len(offsets))
            # Off-centre depths only differ near the heart: render them in its bounding box.
            sub = _bounding_box(heart.outer_sdf < _DEPTH_MARGIN_MM, box)
            if sub is not None and len(offsets) > 1:
                local = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sub, box, strict=True))
                for points in _heart_points(anatomy, phase, plane, sub, offsets[1:]):
                    depth_image = thorax[sub].copy()
                    _paint(depth_image, heart_layers(*points, anatomy, phase, pixel_mm).layers, looks, pixel_mm, sub)
                    accum[local] += depth_image - centre_image[local]
            image[box] = accum / np.float32(len(offsets))
        out[phase] = (image, labels, motion)
    return out


def _bounding_box(mask: np.ndarray, box: tuple[slice, slice]) -> tuple[slice, slice] | None:
    """Bounding box (in plane pixel indices) of ``mask``, given in ``box`` coordinates."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (slice(box[0].start + int(rows[0]), box[0].start + int(rows[-1]) + 1),
            slice(box[1].start + int(cols[0]), box[1].start + int(cols[-1]) + 1))


def _labels(heart: HeartLayers) -> LabelArray:
    crop = np.zeros(heart.lv_sdf.shape, dtype=np.uint8)
    crop[heart.rv_sdf < 0] = Label.RV
    crop[heart.epi_sdf < 0] = Label.MYO
    crop[heart.lv_sdf < 0] = Label.LV
    return crop
