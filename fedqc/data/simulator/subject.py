"""One simulated subject, end to end: anatomy, protocol, slices, acquisition, stored arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedqc.core.types import PHASES, VIEWS, Label, Phase, View
from fedqc.data.simulator.anatomy import SubjectAnatomy, sample_anatomy
from fedqc.data.simulator.planes import SlicePlane, StackGeometry, la_plane, sa_stack
from fedqc.data.simulator.presets import CentreSpec
from fedqc.data.simulator.render import plane_labels, render_plane
from fedqc.data.simulator.scanner import (
    Protocol,
    acquire,
    exam_fields,
    sample_protocol,
    to_stored,
)
from fedqc.data.simulator.tissue import contrast_vector


@dataclass(frozen=True)
class SimulatedSubject:
    """A subject's stored volumes: images int16 and labels uint8, shaped (X, Y, Z); LA has Z = 1."""

    images: dict[tuple[View, Phase], np.ndarray]
    labels: dict[tuple[View, Phase], np.ndarray]
    affines: dict[View, np.ndarray]
    anatomy: SubjectAnatomy
    protocol: Protocol


#: Plans of the four-chamber view tried before the best one is kept.
LA_PLAN_ATTEMPTS = 20
#: The smallest area (mm^2) of the LV, myocardium and RV that a four-chamber plan must cut at ED and ES.
#: Real end-systolic RV areas in that view are about 8-14 cm^2; 4 cm^2 only rules out a plane that
#: grazes the RV.
LA_MIN_AREA_MM2 = 400.0


def plan_four_chamber(anatomy: SubjectAnatomy, geometry: StackGeometry, rng: np.random.Generator
                      ) -> tuple[SlicePlane, np.ndarray]:
    """The four-chamber plane, re-planned until it cuts the LV, myocardium and RV at ED and at ES.

    A technologist plans the view to show all four chambers; one plan drawn at ED could graze or
    miss the contracted RV at ES (2 of 96 quickstart LA label files had no RV and 3 had under
    20 mm^2: cases whose Dice flips between 1 and 0 on a few voxels; docs/SIMULATOR.md). The
    first plan is kept whenever it cuts every structure by :data:`LA_MIN_AREA_MM2`, so only the
    subjects it missed change; after :data:`LA_PLAN_ATTEMPTS` plans the one with the largest
    smallest structure is kept.
    """
    pixel_mm2 = float(geometry.spacing_mm[0] * geometry.spacing_mm[1])
    best = None
    for _ in range(LA_PLAN_ATTEMPTS):
        plane, affine = la_plane(anatomy, geometry, rng)
        smallest = min(float(np.count_nonzero(labels == k)) * pixel_mm2
                       for labels in (plane_labels(anatomy, plane, phase) for phase in PHASES)
                       for k in (Label.LV, Label.MYO, Label.RV))
        if best is None or smallest > best[0]:
            best = (smallest, plane, affine)
        if smallest >= LA_MIN_AREA_MM2:
            break
    return best[1], best[2]


def simulate_subject(rng: np.random.Generator, disease: str, centre: CentreSpec, shift_strength: float = 1.0,
                     depths: int = 3) -> SimulatedSubject:
    """Simulate one subject with ``disease`` scanned at ``centre``.

    Args:
        rng: the subject's own random generator (everything about the subject comes from it).
        disease: M&Ms-2 disease code.
        centre: the hospital.
        shift_strength: see :class:`presets.Preset`.
        depths: sub-slices averaged across a slice's thickness near the heart (odd).
    """
    # Separate streams: the same subject seed with another disease keeps the same scanner draws.
    anatomy_rng, rng = rng.spawn(2)
    anatomy = sample_anatomy(anatomy_rng, disease)
    protocol = sample_protocol(centre, rng, shift_strength)
    sa_planes, sa_affine = sa_stack(anatomy, protocol.geometry, rng)
    la, la_affine = plan_four_chamber(anatomy, protocol.geometry, rng)
    fields = exam_fields(protocol, rng)
    contrast = contrast_vector(protocol.contrast)
    images: dict[tuple[View, Phase], np.ndarray] = {}
    labels: dict[tuple[View, Phase], np.ndarray] = {}
    for view, planes in zip(VIEWS, (sa_planes, [la]), strict=True):
        slices: dict[Phase, list] = {p: [] for p in PHASES}
        masks: dict[Phase, list] = {p: [] for p in PHASES}
        for plane in planes:
            for phase, (image, label, motion) in render_plane(anatomy, plane, contrast, rng, PHASES, depths).items():
                slices[phase].append(acquire(image, motion, protocol, fields, rng))
                masks[phase].append(label)
        # ED and ES are frames of one cine series: one intensity scaling for both.
        stored = to_stored(np.stack([np.stack(slices[p], axis=-1) for p in PHASES]), protocol)
        for k, phase in enumerate(PHASES):
            images[(view, phase)] = stored[k]
            labels[(view, phase)] = np.stack(masks[phase], axis=-1)
    return SimulatedSubject(images=images, labels=labels, affines={"SA": sa_affine, "LA": la_affine},
                            anatomy=anatomy, protocol=protocol)
