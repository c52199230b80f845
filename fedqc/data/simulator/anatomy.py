"""A subject's anatomy: the numbers that describe one heart (ED and ES) in one thorax.

Sampling is kept apart from rendering (:mod:`.heart`, :mod:`.body`) so a subject is a small,
printable, frozen record. Pathologies change these numbers the way they change real hearts:
dilated cavities, thick walls, a flattened septum, a big right atrium. Coordinates are world
(RAS+, mm): x to the patient's right, y anterior, z superior.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedqc.data.simulator.shapes import random_waves

#: M&Ms-2 disease codes.
DISEASES: tuple[str, ...] = ("NOR", "LV", "HCM", "ARR", "FALL", "CIA", "TRI", "DRV")
DISEASE_NAMES: dict[str, str] = {
    "NOR": "normal", "LV": "dilated left ventricle", "HCM": "hypertrophic cardiomyopathy",
    "ARR": "arrhythmogenic cardiomyopathy", "FALL": "tetralogy of Fallot (repaired)",
    "CIA": "interatrial communication", "TRI": "tricuspid regurgitation", "DRV": "dilated right ventricle",
}


@dataclass(frozen=True)
class PhaseShape:
    """Ventricle and atrium sizes at one cardiac phase (mm unless named otherwise)."""

    lv_radii_mm: tuple[float, float]
    lv_length_mm: float
    lv_taper: float
    wall_mm: float
    septal_extra: float  # extra septal thickness, as a fraction of wall_mm
    septal_flattening: float  # 0 round septum, ~0.3 D-shaped LV (RV overload)
    rv_width_mm: float  # free wall to septum, along the LV -> RV axis
    rv_reach_mm: float  # half-extent across that axis: how far the horns wrap
    rv_inner_mm: float  # where the RV bullet starts behind the LV centre (sets the insertion points)
    rv_offset_mm: float  # shift of the RV across the LV -> RV axis (anterior/inferior asymmetry)
    rv_length_mm: float
    rv_wall_mm: float
    papillary_radius_mm: float
    la_scale: float
    ra_scale: float
    rvot_radius_mm: float


@dataclass(frozen=True)
class BodyShape:
    """The thorax around the heart (world mm)."""

    centre_xy_mm: tuple[float, float]
    semi_axes_mm: tuple[float, float]
    fat_mm: float
    muscle_mm: float
    dome_z_mm: tuple[float, float]  # left, right hemidiaphragm tops
    spine_xy_mm: tuple[float, float]
    aorta_xy_mm: tuple[float, float]
    aorta_radius_mm: float


@dataclass(frozen=True)
class SubjectAnatomy:
    """Everything needed to render one subject at ED and ES, in any slice plane."""

    disease: str
    disease_severity: float
    ed: PhaseShape
    es: PhaseShape
    apex_mm: np.ndarray  # LV apex (endocardial), fixed over the cycle
    long_axis: np.ndarray  # unit, apex -> base
    rv_axis: np.ndarray  # unit, perpendicular to long_axis, LV -> RV
    deform_waves: np.ndarray  # (3, n, 5) per-axis smooth displacement
    trabecula_waves: np.ndarray  # short-wavelength texture for trabeculae
    fat_waves: np.ndarray  # epicardial fat thickness variation
    body_waves: np.ndarray  # slow irregularity of the body wall layers
    rv_harmonics: np.ndarray  # (n, 3): order, amplitude mm, phase
    mitral_tilt: tuple[float, float]
    tricuspid_tilt: tuple[float, float]
    tricuspid_drop_mm: float
    papillary_angles_rad: tuple[float, float]
    aorta_radius_mm: float
    pa_radius_mm: float
    body: BodyShape

    def phase(self, name: str) -> PhaseShape:
        """The shape at ``"ED"`` or ``"ES"``."""
        return self.ed if name == "ED" else self.es

    def frame(self, phase: str) -> tuple[np.ndarray, np.ndarray]:
        """Heart frame at ``phase``: origin (mitral-plane centre) and rotation (columns u, v, w)."""
        length = self.phase(phase).lv_length_mm
        w = self.long_axis
        u = self.rv_axis
        rotation = np.column_stack([u, np.cross(w, u), w])
        return self.apex_mm + length * w, rotation


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _normal_ed(rng: np.random.Generator, size: float) -> PhaseShape:
    ru = rng.normal(24.5, 1.8) * size
    wall = rng.normal(7.5, 0.7) * size
    length = rng.normal(82.0, 5.0) * size
    epi = ru + wall
    return PhaseShape(
        lv_radii_mm=(ru, ru * rng.uniform(0.88, 1.05)), lv_length_mm=length, lv_taper=rng.uniform(0.1, 0.25),
        wall_mm=wall, septal_extra=rng.uniform(0.0, 0.2), septal_flattening=0.0,
        rv_width_mm=rng.uniform(20, 30) * size, rv_reach_mm=epi * rng.uniform(1.2, 1.4),
        rv_inner_mm=-epi * rng.uniform(0.05, 0.3), rv_offset_mm=epi * rng.uniform(-0.1, 0.2),
        rv_length_mm=length * rng.uniform(0.82, 0.95), rv_wall_mm=rng.uniform(2.5, 3.8),
        papillary_radius_mm=rng.uniform(3.0, 4.2), la_scale=1.0, ra_scale=1.0,
        rvot_radius_mm=rng.uniform(12.0, 15.0) * size,
    )


def _dilate_rv(shape: PhaseShape, factor: float) -> PhaseShape:
    length = min(shape.rv_length_mm * (1 + 0.5 * (factor - 1)), 1.02 * shape.lv_length_mm)
    return replace(shape, rv_width_mm=shape.rv_width_mm * (1 + 1.6 * (factor - 1)),
                   rv_reach_mm=shape.rv_reach_mm * (1 + 0.5 * (factor - 1)), rv_length_mm=length)


def _apply_disease(ed: PhaseShape, disease: str, sev: float, rng: np.random.Generator
                   ) -> tuple[PhaseShape, dict[str, float]]:
    """ED shape with the pathology applied, and how systole should change it."""
    # Systolic factors: cavity radius, LV length, RV size.
    systole = {"lv_radius": rng.uniform(0.64, 0.72), "lv_length": rng.uniform(0.86, 0.9),
               "rv": rng.uniform(0.74, 0.8)}
    if disease == "LV":
        ru, rv = ed.lv_radii_mm
        f = 1.25 + 0.25 * sev
        ed = replace(ed, lv_radii_mm=(ru * f, rv * f), lv_length_mm=ed.lv_length_mm * (1.08 + 0.08 * sev),
                     wall_mm=ed.wall_mm * rng.uniform(0.75, 0.9))
        systole.update(lv_radius=rng.uniform(0.82, 0.9), lv_length=rng.uniform(0.93, 0.97))
    elif disease == "HCM":
        ru, rv = ed.lv_radii_mm
        ed = replace(ed, wall_mm=ed.wall_mm * (1.5 + 0.8 * sev), septal_extra=rng.uniform(0.3, 0.9),
                     lv_radii_mm=(ru * 0.85, rv * 0.85), papillary_radius_mm=ed.papillary_radius_mm * 1.5)
        systole.update(lv_radius=rng.uniform(0.5, 0.6))
    elif disease == "ARR":
        ed = replace(_dilate_rv(ed, 1.1 + 0.15 * sev), rv_wall_mm=ed.rv_wall_mm * 0.8)
        systole.update(rv=rng.uniform(0.84, 0.9))
    elif disease == "FALL":
        ed = replace(_dilate_rv(ed, 1.2 + 0.2 * sev), rv_wall_mm=ed.rv_wall_mm * (1.6 + 0.6 * sev),
                     septal_flattening=rng.uniform(0.12, 0.28), rvot_radius_mm=ed.rvot_radius_mm * 1.3)
        systole.update(rv=rng.uniform(0.82, 0.88))
    elif disease == "CIA":
        ed = replace(_dilate_rv(ed, 1.15 + 0.15 * sev), ra_scale=1.3, septal_flattening=rng.uniform(0.0, 0.12))
    elif disease == "TRI":
        ed = replace(_dilate_rv(ed, 1.2 + 0.2 * sev), ra_scale=1.5 + 0.4 * sev)
        systole.update(rv=rng.uniform(0.8, 0.86))
    elif disease == "DRV":
        ed = replace(_dilate_rv(ed, 1.35 + 0.3 * sev), septal_flattening=rng.uniform(0.15, 0.3))
        systole.update(rv=rng.uniform(0.82, 0.88))
    return ed, systole


def _systole(ed: PhaseShape, f: dict[str, float]) -> PhaseShape:
    ru, rv = ed.lv_radii_mm
    r = f["lv_radius"]
    # Myocardium keeps (roughly) its volume: the wall thickens as the cavity shrinks.
    wall = ed.wall_mm * (1.0 + 0.9 * (1.0 - r) * (1.0 + ru / (ru + ed.wall_mm)))
    return replace(
        ed, lv_radii_mm=(ru * r, rv * r), lv_length_mm=ed.lv_length_mm * f["lv_length"], wall_mm=wall,
        rv_width_mm=ed.rv_width_mm * f["rv"] ** 1.5, rv_reach_mm=ed.rv_reach_mm * f["rv"] ** 0.5,
        rv_inner_mm=ed.rv_inner_mm * f["rv"], rv_length_mm=ed.rv_length_mm * (0.5 + 0.5 * f["lv_length"]),
        rv_wall_mm=ed.rv_wall_mm * 1.3, papillary_radius_mm=ed.papillary_radius_mm * 1.35,
        la_scale=ed.la_scale * 1.15, ra_scale=ed.ra_scale * 1.12, rvot_radius_mm=ed.rvot_radius_mm * 0.85,
    )


def _sample_body(rng: np.random.Generator) -> BodyShape:
    ax, ay = rng.uniform(140, 170), rng.uniform(95, 120)
    return BodyShape(
        centre_xy_mm=(rng.uniform(-10, 10), 0.0), semi_axes_mm=(ax, ay), fat_mm=rng.uniform(5, 22),
        muscle_mm=rng.uniform(9, 15), dome_z_mm=(0.0, 0.0), spine_xy_mm=(rng.uniform(-5, 5), -ay + 62),
        aorta_xy_mm=(rng.uniform(-32, -20), -ay + rng.uniform(88, 98)), aorta_radius_mm=rng.uniform(10, 13),
    )


def sample_anatomy(rng: np.random.Generator, disease: str) -> SubjectAnatomy:
    """Draw one subject with ``disease`` (an M&Ms-2 code).

    Raises:
        ValueError: for an unknown disease code.
    """
    if disease not in DISEASES:
        raise ValueError(f"unknown disease {disease!r}; expected one of {DISEASES}")
    sev = float(rng.uniform(0.3, 1.0)) if disease != "NOR" else 0.0
    size = float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.15))
    ed, systole = _apply_disease(_normal_ed(rng, size), disease, sev, rng)
    es = _systole(ed, systole)

    long_axis = _unit(np.array([0.55, -0.45, 0.70]) + rng.normal(0, 0.12, 3))
    # The RV lies to the patient's right of the LV and somewhat anterior, seen down the long axis.
    anterior = _unit(np.array([0.0, 1.0, 0.0]) - long_axis[1] * long_axis)
    right = np.cross(anterior, long_axis)
    right = right if right[0] > 0 else -right
    tilt = rng.uniform(0.15, 0.6)
    rv_axis = np.cos(tilt) * right + np.sin(tilt) * anterior
    body = _sample_body(rng)
    chest_y = body.semi_axes_mm[1] - body.fat_mm - body.muscle_mm
    mid = np.array([body.spine_xy_mm[0] - rng.uniform(15, 35), chest_y - rng.uniform(45, 58), 0.0])
    apex = mid - 0.5 * ed.lv_length_mm * long_axis
    dome_left = apex[2] - (ed.lv_radii_mm[0] + ed.wall_mm) * 0.9 + rng.uniform(-6, 6)
    body = replace(body, dome_z_mm=(dome_left, dome_left + rng.uniform(8, 22)))

    harmonics = np.column_stack([np.arange(2, 6), rng.normal(0, 1.2, 4) * (2.5 if disease == "ARR" else 1.0),
                                 rng.uniform(0, 2 * np.pi, 4)]).astype(np.float32)
    return SubjectAnatomy(
        disease=disease, disease_severity=sev, ed=ed, es=es, apex_mm=apex, long_axis=long_axis, rv_axis=rv_axis,
        deform_waves=np.stack([random_waves(rng, 3, (70, 160), 1.9) for _ in range(3)]),
        trabecula_waves=random_waves(rng, 5, (4.0, 8.0), 1.1),
        fat_waves=random_waves(rng, 4, (18, 45), 1.1),
        body_waves=random_waves(rng, 4, (60, 180), 0.5),
        rv_harmonics=harmonics,
        mitral_tilt=(rng.uniform(-0.25, -0.05), rng.uniform(-0.2, 0.2)),
        tricuspid_tilt=(rng.uniform(0.1, 0.35), rng.uniform(-0.2, 0.2)),
        tricuspid_drop_mm=rng.uniform(4, 10),
        papillary_angles_rad=(np.pi + rng.uniform(0.6, 1.0), np.pi - rng.uniform(0.6, 1.0)),
        aorta_radius_mm=rng.uniform(12, 15) * size,
        pa_radius_mm=rng.uniform(11, 14) * size * (1.25 if disease == "CIA" else 1.0),
        body=body,
    )
