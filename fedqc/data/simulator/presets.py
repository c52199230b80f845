"""Consortia of simulated hospitals: each centre's scanner, protocol and how far it departs from the
reference cine appearance. Plain frozen data, so configs and docs can list it (:func:`preset_table`).

A centre's :class:`Appearance` is what its protocol looks like at full severity; each subject gets
a severity drawn from the centre's range (patients differ: breath-holding, body size, heart rate),
and the subject's appearance is the reference moved that far toward the centre's. For centres not
meant to be labelled, the severity is multiplied by the preset's ``shift_strength``: 0 makes them
look like the reference scanner (apart from resolution and geometry), 1 is the default shift, 2
extrapolates (blood/myocardium contrast inverts at centre 4 of ``consortium``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedqc.core.errors import ConfigError
from fedqc.data.simulator.anatomy import DISEASES
from fedqc.data.simulator.tissue import REFERENCE_CONTRAST

#: As in M&Ms-2, tricuspid regurgitation and dilated RV appear only outside the labelled centres.
LABELLED_DISEASES: tuple[str, ...] = ("NOR", "LV", "HCM", "ARR", "FALL", "CIA")


@dataclass(frozen=True)
class Appearance:
    """A protocol's look at full severity.

    Attributes:
        contrast: intensity per tissue (see :data:`tissue.REFERENCE_CONTRAST`).
        snr: blood signal over noise standard deviation (Rician magnitude noise).
        bias: standard deviation of the log coil/B1 bias field over the field of view.
        ghost: amplitude of respiratory/motion ghosts of the heart along the phase-encode axis.
        gamma: intensity gamma of the stored image (1 none; < 1 compresses bright tissue).
        banding: depth of bSSFP off-resonance dark bands (0 none, 1 black).
    """

    contrast: Mapping[str, float]
    snr: float
    bias: float
    ghost: float
    gamma: float
    banding: float


REFERENCE_APPEARANCE = Appearance(contrast=REFERENCE_CONTRAST, snr=40.0, bias=0.05, ghost=0.0, gamma=1.0,
                                  banding=0.0)


@dataclass(frozen=True)
class CentreSpec:
    """One simulated hospital: its scanner, protocol ranges and appearance.

    Ranges are ``(low, high)`` and drawn uniformly per subject.
    """

    centre: int
    vendor: str
    scanner: str
    field_t: float
    labelled: bool  # meant to provide labelled (training) data
    diseases: tuple[str, ...]
    pixel_spacing_mm: tuple[float, float]
    fov_mm: tuple[float, float]
    phase_fov: tuple[float, float]  # phase-encode field of view, fraction of the readout one
    slice_thickness_mm: tuple[float, float]
    slice_gap_mm: tuple[float, float]
    n_slices: tuple[int, int]
    la_thickness_mm: float
    kspace_fraction: tuple[float, float]  # acquired / reconstructed resolution along phase encode
    kspace_filter: str  # "none" (Gibbs ringing), "tukey" or "hann"
    phase_axis: int  # array axis (0 or 1) of phase encoding: ghosts and lower resolution lie along it
    severity: tuple[float, float]
    appearance: Appearance
    intensity_max: float  # stored int16 values reach about this


@dataclass(frozen=True)
class Preset:
    """A consortium: centres, default subjects per centre, shift strength and rendering detail."""

    name: str
    description: str
    centres: tuple[CentreSpec, ...]
    subjects_per_centre: int
    shift_strength: float = 1.0
    depths: int = 3  # sub-slices averaged across a slice's thickness near the heart


_SIEMENS_15 = Appearance(
    contrast={**REFERENCE_CONTRAST, "myocardium": 0.27, "fat": 0.84, "liver": 0.3},
    snr=32.0, bias=0.15, ghost=0.04, gamma=1.0, banding=0.0)
_PHILIPS_15 = Appearance(
    contrast={**REFERENCE_CONTRAST, "myocardium": 0.33, "fat": 0.95, "liver": 0.38, "muscle": 0.28, "lung": 0.09},
    snr=26.0, bias=0.2, ghost=0.06, gamma=0.9, banding=0.0)
# 3 T bSSFP: B1 shading, off-resonance bands, flatter blood/myocardium contrast, darker fat.
_GE_3T = Appearance(
    contrast={**REFERENCE_CONTRAST, "myocardium": 0.5, "blood": 0.95, "vessel": 0.85, "fat": 0.6,
              "liver": 0.48, "muscle": 0.42, "lung": 0.14, "abdomen": 0.5},
    snr=16.0, bias=0.55, ghost=0.12, gamma=1.35, banding=0.8)
# Older 1.5 T spoiled-gradient-echo cine: weak blood/myocardium contrast, fat brighter than blood.
_SIEMENS_GRE = Appearance(
    contrast={**REFERENCE_CONTRAST, "blood": 0.6, "vessel": 0.68, "myocardium": 0.4, "fat": 0.95,
              "liver": 0.45, "muscle": 0.36, "marrow": 0.8, "csf": 0.3, "lung": 0.05, "abdomen": 0.5},
    snr=11.0, bias=0.3, ghost=0.22, gamma=0.8, banding=0.0)


def _centre(centre: int, vendor: str, scanner: str, field_t: float, labelled: bool, appearance: Appearance,
            **protocol: Any) -> CentreSpec:
    defaults: dict[str, Any] = dict(
        diseases=LABELLED_DISEASES if labelled else DISEASES, phase_fov=(0.8, 0.95),
        slice_thickness_mm=(8.0, 8.0), slice_gap_mm=(1.5, 2.0), n_slices=(8, 12), la_thickness_mm=7.0,
        kspace_filter="tukey", phase_axis=1, severity=(0.5, 1.0) if labelled else (0.55, 1.0), intensity_max=1000.0)
    defaults.update(protocol)
    return CentreSpec(centre=centre, vendor=vendor, scanner=scanner, field_t=field_t, labelled=labelled,
                      appearance=appearance, **defaults)


def _consortium_centres(fov_mm: tuple[float, float], scale: float) -> tuple[CentreSpec, ...]:
    """The four consortium hospitals; ``scale`` enlarges pixels for the small presets."""

    def px(lo: float, hi: float) -> tuple[float, float]:
        return (round(lo * scale, 2), round(hi * scale, 2))

    return (
        _centre(1, "SIEMENS", "Avanto", 1.5, True, _SIEMENS_15, pixel_spacing_mm=px(1.25, 1.45), fov_mm=fov_mm,
                kspace_fraction=(0.75, 0.85), intensity_max=700.0),
        _centre(2, "Philips", "Achieva", 1.5, True, _PHILIPS_15, pixel_spacing_mm=px(1.2, 1.4), fov_mm=fov_mm,
                kspace_fraction=(0.7, 0.8), kspace_filter="hann", phase_axis=0, slice_gap_mm=(0.0, 1.0),
                intensity_max=3000.0),
        _centre(3, "GE", "Signa HDxt", 3.0, False, _GE_3T, pixel_spacing_mm=px(1.6, 1.9), fov_mm=fov_mm,
                kspace_fraction=(0.55, 0.65), kspace_filter="none", slice_thickness_mm=(10.0, 10.0),
                slice_gap_mm=(0.0, 0.0), la_thickness_mm=8.0, intensity_max=2000.0),
        _centre(4, "SIEMENS", "Symphony", 1.5, False, _SIEMENS_GRE, pixel_spacing_mm=px(1.5, 1.8), fov_mm=fov_mm,
                kspace_fraction=(0.6, 0.7), phase_axis=0, slice_thickness_mm=(8.0, 8.0), slice_gap_mm=(2.0, 2.0),
                la_thickness_mm=8.0, intensity_max=500.0),
    )


PRESETS: Mapping[str, Preset] = {
    "consortium": Preset(
        name="consortium",
        description="4 centres, 3 vendors: two labelled 1.5 T bSSFP centres (1, 2) and two shifted, unlabelled "
                    "ones (3: 3 T bSSFP with B1 shading and banding; 4: older gradient-echo cine with weak "
                    "contrast and ghosting); TRI and DRV only at 3 and 4.",
        centres=_consortium_centres((250.0, 300.0), 1.0), subjects_per_centre=24),
    "quickstart": Preset(
        name="quickstart",
        description="The consortium's 4 centres with small matrices (about 96-128 px) and 10 subjects each, "
                    "for a few-minute CPU demo.",
        centres=_consortium_centres((180.0, 200.0), 1.15), subjects_per_centre=10),
    "tiny": Preset(
        name="tiny",
        description="2 centres (1 labelled, 1 shifted), 64 px matrices, 5-6 slices, 3 subjects each: for tests.",
        centres=tuple(dataclasses.replace(c, centre=i + 1, pixel_spacing_mm=(2.3, 2.5), fov_mm=(150.0, 160.0),
                                          phase_fov=(1.0, 1.0), n_slices=(5, 6), slice_gap_mm=(4.0, 4.0))
                      for i, c in enumerate(_consortium_centres((150.0, 160.0), 1.0)[::2])),
        subjects_per_centre=3, depths=1),
}


def get_preset(name: str, shift_strength: float | None = None) -> Preset:
    """The preset called ``name``, with ``shift_strength`` overriding its default when given.

    Raises:
        ConfigError: for an unknown name or a negative shift strength.
    """
    if name not in PRESETS:
        raise ConfigError("simulated.preset", f"unknown simulator preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    if shift_strength is not None:
        if shift_strength < 0:
            raise ConfigError("simulated.shift_strength", f"must be >= 0, got {shift_strength}")
        preset = dataclasses.replace(preset, shift_strength=float(shift_strength))
    return preset


def preset_table(name: str) -> list[dict[str, Any]]:
    """One plain row per centre of preset ``name`` (for docs, configs and reports)."""
    preset = get_preset(name)
    rows = []
    for c in preset.centres:
        row = dataclasses.asdict(c)
        row.pop("appearance")
        row.update({f"appearance_{k}": v for k, v in dataclasses.asdict(c.appearance).items() if k != "contrast"})
        row["blood_myocardium_ratio"] = round(c.appearance.contrast["blood"] / c.appearance.contrast["myocardium"], 2)
        rows.append(row)
    return rows
