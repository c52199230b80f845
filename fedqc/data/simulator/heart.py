"""The heart as signed-distance layers in its own frame, and the three labelled structures.

Heart frame (mm): origin at the centre of the mitral valve plane, ``w`` along the long axis toward
the base, ``u`` toward the RV, ``v = w x u``. The same functions serve short- and long-axis planes,
so both views of a subject show one heart.

What makes segmentation a real task here: the RV is whatever of a wider bullet lies outside the
LV epicardium (a crescent that wraps the curved septum and thins toward the apex) and below a tilted
tricuspid plane, above which the right atrium has the same intensity; its thin free wall lies
between bright RV blood and bright epicardial fat; trabeculae and papillary muscles have
myocardial intensity but belong to the cavities; the RVOT continues the RV label to the pulmonary
valve while the aortic root next to it is unlabelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedqc.core.types import FloatArray
from fedqc.data.simulator.anatomy import SubjectAnatomy
from fedqc.data.simulator.shapes import (
    bullet_sdf,
    capsule_sdf,
    ellipsoid_sdf,
    inside_fraction,
    smooth_max,
    wave_field,
)
from fedqc.data.simulator.tissue import Tissue

#: A paint layer: (signed distance mm, or a ready fraction in [0, 1]), tissue, is_fraction.
Layer = tuple[FloatArray, Tissue, bool]


@dataclass(frozen=True)
class HeartLayers:
    """Paint layers (back to front) and the signed distances that define the labels."""

    layers: list[Layer]
    lv_sdf: FloatArray  # LV blood pool (papillary muscles and trabeculae included)
    epi_sdf: FloatArray  # LV epicardium; myocardium = inside epi and outside LV
    rv_sdf: FloatArray  # RV cavity (RVOT to the pulmonary valve included)
    outer_sdf: FloatArray  # everything painted (epicardial fat included) lies inside this


_ABSENT = np.float32(1e4)  # signed distance of a structure the slice does not reach


def _reaches(w: FloatArray, low_mm: float, high_mm: float) -> bool:
    """Whether the points span long-axis heights that overlap [low, high] (cheap culling)."""
    return bool(w.max() >= low_mm and w.min() <= high_mm)


def _vertical_capsule(u: FloatArray, v: FloatArray, w: FloatArray, centre: tuple[float, float],
                      w_range: tuple[float, float], radius_mm: float) -> FloatArray:
    dw = w - np.clip(w, np.float32(w_range[0]), np.float32(w_range[1]))
    du, dv = u - np.float32(centre[0]), v - np.float32(centre[1])
    return np.sqrt(du * du + dv * dv + dw * dw) - np.float32(radius_mm)


def heart_layers(u: FloatArray, v: FloatArray, w: FloatArray, anatomy: SubjectAnatomy, phase: str,
                 pixel_mm: float) -> HeartLayers:
    """Paint layers of the heart at heart-frame points ``(u, v, w)`` (already deformed).

    Structures a slice cannot reach (atria in an apical slice) are skipped, which is what keeps
    rendering fast; absent structures have distance ``_ABSENT``.

    Args:
        u, v, w: heart-frame coordinates in mm, any (equal) shape.
        anatomy: the subject.
        phase: ``"ED"`` or ``"ES"``.
        pixel_mm: pixel size, which sets how wide fractional (trabecular) edges are.
    """
    s = anatomy.phase(phase)
    f32 = np.float32
    ru, rv = s.lv_radii_mm
    length = s.lv_length_mm
    w_mitral = f32(anatomy.mitral_tilt[0]) * u + f32(anatomy.mitral_tilt[1]) * v
    # The RV wraps the septum as it is, thickened (septal_extra, HCM) or not: without the septal
    # extra here a thick ES septum filled the RV (HCM ES volumes of 1-25 mL; docs/SIMULATOR.md).
    epi_mm = ru + s.wall_mm * (1.0 + s.septal_extra)
    au = 0.5 * (epi_mm + s.rv_width_mm - s.rv_inner_mm)
    av = s.rv_reach_mm
    cu, cv = s.rv_inner_mm + au, s.rv_offset_mm
    w_tricuspid = (f32(-anatomy.tricuspid_drop_mm) + f32(anatomy.tricuspid_tilt[0]) * (u - f32(cu))
                   + f32(anatomy.tricuspid_tilt[1]) * v)
    above_mitral = w - w_mitral
    above_tricuspid = w - w_tricuspid

    # Left ventricle: cavity, wall thicker at the septum, thinner at the apex.
    d_endo = bullet_sdf(u, v, w, (ru, rv), length, 0.55 * length, s.lv_taper)
    if s.septal_flattening > 0:
        d_endo = smooth_max(d_endo, u - f32(ru * (1 - s.septal_flattening)), 6.0)
    septal = np.clip(u / (np.sqrt(u * u + v * v) + f32(1e-3)), 0.0, 1.0) ** 2
    apical = np.clip((-w - 0.55 * length) / (0.45 * length), 0.0, 1.0)
    d_epi_open = d_endo - f32(s.wall_mm) * (1.0 + f32(s.septal_extra) * septal) * (1.0 - 0.35 * apical)
    d_epi = np.maximum(d_epi_open, above_mitral)
    d_lv = np.maximum(d_endo, above_mitral)

    # Great vessels.
    ao_start = np.array([0.3 * ru, 0.25 * ru, -4.0])
    ao_dir = np.array([0.15, 0.35, 1.0]) / np.linalg.norm([0.15, 0.35, 1.0])
    d_ao = _ABSENT
    if _reaches(w, -4.0 - anatomy.aorta_radius_mm, 200.0):
        d_ao = capsule_sdf(u, v, w, ao_start, ao_start + 110 * ao_dir, anatomy.aorta_radius_mm)
    pv = np.array([cu - 0.45 * au, 0.8 * av, 6.0])
    pa_dir = np.array([-0.6, 0.3, 0.75]) / np.linalg.norm([-0.6, 0.3, 0.75])
    d_pa = _ABSENT
    if _reaches(w, pv[2] - anatomy.pa_radius_mm, 200.0):
        d_pa = capsule_sdf(u, v, w, pv, pv + 70 * pa_dir, anatomy.pa_radius_mm)

    # Right ventricle: a wider bullet minus the LV, with an irregular outline and an outflow tract.
    ur, vr = u - f32(cu), v - f32(cv)
    d_rv_body = bullet_sdf(ur, vr, w, (au, av), s.rv_length_mm, 0.75 * s.rv_length_mm, 0.25)
    angle = np.arctan2(vr / f32(av), ur / f32(au))
    fade = np.clip((w + f32(s.rv_length_mm)) / f32(0.6 * s.rv_length_mm), 0.0, 1.0)  # smaller bumps near the apex
    for order, amp, phase_rad in anatomy.rv_harmonics:
        d_rv_body = d_rv_body + (amp * fade) * np.cos(order * angle + phase_rad)
    d_rv_open = np.maximum(d_rv_body, above_tricuspid)
    if _reaches(w, -0.25 * length - s.rvot_radius_mm, pv[2]):
        d_rvot = capsule_sdf(u, v, w, np.array([cu, 0.45 * av, -0.25 * length]), pv, s.rvot_radius_mm)
        d_rv_open = np.minimum(d_rv_open, np.maximum(d_rvot, w - f32(pv[2])))
    d_rv = np.maximum(np.maximum(d_rv_open, -d_epi_open), -d_ao - 2.0)
    d_rv_wall = np.maximum(d_rv_open - f32(s.rv_wall_mm), above_tricuspid - f32(s.rv_wall_mm))

    # Atria above the valve planes: same blood, no label.
    d_la = d_ra = _ABSENT
    if above_mitral.max() > -3.0:
        la_c = np.array([-0.2 * ru, -0.5 * ru, 14.0 * s.la_scale])
        d_la = np.maximum(ellipsoid_sdf(u - f32(la_c[0]), v - f32(la_c[1]), w - f32(la_c[2]),
                                        tuple(r * s.la_scale for r in (26.0, 21.0, 24.0))), -above_mitral)
    if above_tricuspid.max() > -3.0:
        ra_c = np.array([cu + 0.2 * au, -0.35 * av, -anatomy.tricuspid_drop_mm + 16.0 * s.ra_scale])
        d_ra = np.maximum(ellipsoid_sdf(u - f32(ra_c[0]), v - f32(ra_c[1]), w - f32(ra_c[2]),
                                        tuple(r * s.ra_scale for r in (24.0, 23.0, 26.0))), -above_tricuspid)

    # Epicardial fat: irregular, thickest in the atrioventricular groove.
    envelope = np.minimum(np.minimum(d_epi, d_rv_wall), np.minimum(np.minimum(d_la, d_ra) - 2.0, d_ao))
    groove = np.exp(-((above_tricuspid / 10.0) ** 2))
    fat_field = np.clip(0.5 + 0.35 * wave_field(u, v, w, anatomy.fat_waves), 0.0, 1.0)
    d_fat = envelope - (0.5 + 3.5 * fat_field + 5.0 * groove)

    # Trabeculae and papillary muscles: myocardial intensity inside the labelled cavities.
    trab = wave_field(u, v, w, anatomy.trabecula_waves)
    # A band under the endocardium (2.5 mm LV, 4 mm RV) where the texture is high enough.
    trab_lv = (inside_fraction(d_lv, pixel_mm) * np.clip(1.0 + d_lv / 2.5, 0.0, 1.0)
               * np.clip((trab - 1.0) / 0.8, 0.0, 1.0))
    trab_rv = (inside_fraction(d_rv, pixel_mm) * np.clip(1.0 + d_rv / 4.0, 0.0, 1.0)
               * np.clip((trab - 0.6) / 0.8, 0.0, 1.0))
    layers: list[Layer] = [(d_fat, Tissue.FAT, False)]
    for d, tissue in ((d_ao, Tissue.VESSEL), (d_pa, Tissue.VESSEL), (d_ra - 1.3, Tissue.MYOCARDIUM),
                      (d_ra, Tissue.VESSEL), (d_la - 1.3, Tissue.MYOCARDIUM), (d_la, Tissue.VESSEL)):
        if not np.isscalar(d):
            layers.append((d, tissue, False))
    layers += [(d_rv_wall, Tissue.MYOCARDIUM, False), (d_rv, Tissue.BLOOD, False), (trab_rv, Tissue.MYOCARDIUM, True)]
    if _reaches(w, -0.62 * length - 3.0, -0.55 * length + 3.0):
        moderator = capsule_sdf(u, v, w, np.array([ru + s.wall_mm, -0.2 * rv, -0.62 * length]),
                                np.array([cu + au, -0.3 * av, -0.55 * length]), 1.6)
        layers.append((np.maximum(moderator, d_rv), Tissue.MYOCARDIUM, False))
    layers += [(d_epi, Tissue.MYOCARDIUM, False), (d_lv, Tissue.BLOOD, False)]
    pap_w = (-0.78 * length, -0.3 * length)
    if _reaches(w, pap_w[0] - s.papillary_radius_mm, pap_w[1] + s.papillary_radius_mm):
        d_pap = None
        for angle_rad in anatomy.papillary_angles_rad:
            pos = (0.55 * ru * np.cos(angle_rad), 0.55 * rv * np.sin(angle_rad))
            one = _vertical_capsule(u, v, w, pos, pap_w, s.papillary_radius_mm)
            d_pap = one if d_pap is None else np.minimum(d_pap, one)
        layers.append((np.maximum(d_pap, d_lv), Tissue.MYOCARDIUM, False))
    layers.append((trab_lv, Tissue.MYOCARDIUM, True))
    return HeartLayers(layers=layers, lv_sdf=d_lv, epi_sdf=d_epi, rv_sdf=d_rv, outer_sdf=d_fat)
