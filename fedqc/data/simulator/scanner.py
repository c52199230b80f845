"""What a centre's scanner does to the magnetisation: a subject's protocol, then the acquisition.

Per subject, :func:`sample_protocol` draws the slice geometry and how strongly the centre's
appearance applies (severity). Per slice, :func:`acquire` applies, in the order physics does:
coil/B1 bias and bSSFP banding (in the object), respiratory ghosts of the moving heart along the
phase-encode axis, truncation of k-space to the acquired resolution with the centre's filter
(none: Gibbs ringing), complex Gaussian noise (so magnitudes are Rician), intensity gamma, and the
vendor's integer scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedqc.core.types import FloatArray
from fedqc.data.simulator.planes import StackGeometry
from fedqc.data.simulator.presets import REFERENCE_APPEARANCE, CentreSpec
from fedqc.data.simulator.tissue import blend_contrast


@dataclass(frozen=True)
class Protocol:
    """One subject's acquisition at one centre (drawn by :func:`sample_protocol`)."""

    severity: float
    contrast: dict[str, float]
    noise_fraction: float  # noise standard deviation over reference blood signal
    bias: float
    ghost: float
    gamma: float
    banding: float
    kspace_fraction: float
    kspace_filter: str
    phase_axis: int
    geometry: StackGeometry
    intensity_max: float


def _lerp(ref: float, target: float, weight: float) -> float:
    return ref + weight * (target - ref)


def sample_protocol(centre: CentreSpec, rng: np.random.Generator, shift_strength: float = 1.0) -> Protocol:
    """Draw one subject's protocol at ``centre``.

    Args:
        centre: the hospital.
        rng: random generator.
        shift_strength: multiplies the severity of centres not meant to be labelled.
    """
    severity = float(rng.uniform(*centre.severity)) * (1.0 if centre.labelled else shift_strength)
    ref, app = REFERENCE_APPEARANCE, centre.appearance
    contrast = blend_contrast(ref.contrast, app.contrast, severity)
    contrast = {k: v * float(rng.normal(1.0, 0.04)) if k != "air" else v for k, v in contrast.items()}
    inv_snr = _lerp(1.0 / ref.snr, 1.0 / app.snr, severity) * rng.uniform(0.85, 1.15)
    spacing = float(rng.uniform(*centre.pixel_spacing_mm))
    fov = float(rng.uniform(*centre.fov_mm))
    n_read = int(round(fov / spacing / 2)) * 2
    n_phase = int(round(fov * rng.uniform(*centre.phase_fov) / spacing / 2)) * 2
    shape = (n_phase, n_read) if centre.phase_axis == 0 else (n_read, n_phase)
    geometry = StackGeometry(
        spacing_mm=(spacing, spacing), shape=shape, slice_thickness_mm=float(rng.uniform(*centre.slice_thickness_mm)),
        slice_gap_mm=float(rng.uniform(*centre.slice_gap_mm)), n_slices=centre.n_slices,
        la_thickness_mm=centre.la_thickness_mm)
    return Protocol(
        severity=severity, contrast=contrast,
        noise_fraction=max(inv_snr, 1e-4) * contrast["blood"] / ref.contrast["blood"],
        bias=max(0.0, _lerp(ref.bias, app.bias, severity)), ghost=max(0.0, _lerp(ref.ghost, app.ghost, severity)),
        gamma=max(0.3, _lerp(ref.gamma, app.gamma, severity)), banding=float(np.clip(severity * app.banding, 0, 1)),
        kspace_fraction=float(rng.uniform(*centre.kspace_fraction)), kspace_filter=centre.kspace_filter,
        phase_axis=centre.phase_axis, geometry=geometry, intensity_max=centre.intensity_max * rng.uniform(0.7, 1.3))


def _low_order_field(rng: np.random.Generator, shape: tuple[int, int]) -> FloatArray:
    """A random quadratic surface over the field of view, zero mean and unit standard deviation."""
    x = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    c = rng.normal(size=5).astype(np.float32)
    field = c[0] * x + c[1] * y + c[2] * x * y + c[3] * x * x + c[4] * y * y
    return (field - field.mean()) / (field.std() + np.float32(1e-6))


@dataclass(frozen=True)
class ExamFields:
    """What stays fixed over a subject's exam (same coils, shim and matrix for every slice)."""

    gain: FloatArray  # coil/B1 bias times bSSFP banding
    window: FloatArray  # k-space window of the half spectrum (``rfft2`` layout)


def _kspace_window(n: int, fraction: float, kind: str, half: bool = False) -> np.ndarray:
    """1D window over FFT frequencies: the kept central ``fraction``, tapered as ``kind``."""
    k = (np.fft.rfftfreq(n) if half else np.abs(np.fft.fftfreq(n))) * 2.0  # 0 at DC, 1 at Nyquist
    kept = k <= fraction
    if kind == "none":
        return kept.astype(np.float32)
    r = k / max(fraction, 1e-6)
    if kind == "hann":
        return np.where(kept, 0.5 + 0.5 * np.cos(np.pi * r), 0.0).astype(np.float32)
    taper = np.clip((r - 0.7) / 0.3, 0.0, 1.0)  # tukey: flat to 70 %, cosine to the edge
    return np.where(kept, 0.5 + 0.5 * np.cos(np.pi * taper), 0.0).astype(np.float32)


def exam_fields(protocol: Protocol, rng: np.random.Generator) -> ExamFields:
    """Draw the exam's bias field and off-resonance bands, and build its k-space window."""
    shape = protocol.geometry.shape
    gain = np.exp(np.float32(protocol.bias) * _low_order_field(rng, shape))
    if protocol.banding > 0:
        cycles = rng.uniform(-0.5, 0.5) + 0.9 * _low_order_field(rng, shape)
        distance = np.abs(np.mod(cycles, 1.0) - 0.5)  # 0 where the off-resonance phase is pi
        gain = gain * (1.0 - np.float32(protocol.banding) * np.exp(-((distance / 0.035) ** 2)))
    axis = protocol.phase_axis
    fractions = [0.0, 0.0]
    fractions[axis], fractions[1 - axis] = protocol.kspace_fraction, min(1.0, protocol.kspace_fraction * 1.25)
    window = np.outer(_kspace_window(shape[0], fractions[0], protocol.kspace_filter),
                      _kspace_window(shape[1], fractions[1], protocol.kspace_filter, half=True))
    return ExamFields(gain=gain.astype(np.float32), window=window.astype(np.float32))


def acquire(image: FloatArray, motion: FloatArray, protocol: Protocol, fields: ExamFields,
            rng: np.random.Generator) -> FloatArray:
    """Turn a noiseless magnetisation image into a reconstructed magnitude image (float32, >= 0).

    Args:
        image: the rendered slice (:func:`render.render_plane`).
        motion: weight of what moves with the heart (ghosts come from it).
        protocol: the subject's protocol.
        fields: the exam's fields (:func:`exam_fields`).
        rng: random generator (ghosts, noise).
    """
    obj = image * fields.gain
    if protocol.ghost > 0:
        axis = protocol.phase_axis
        shift = int(image.shape[axis] // rng.integers(3, 7))
        moving = obj * motion
        sign = np.float32(rng.choice([-1.0, 1.0]))
        ghosts = np.roll(moving, shift, axis) + np.roll(moving, -shift, axis)
        obj = obj + np.float32(0.5 * protocol.ghost) * sign * ghosts
    data = np.fft.irfft2(np.fft.rfft2(obj) * fields.window, s=image.shape).astype(np.float32)
    sigma = np.float32(protocol.noise_fraction * REFERENCE_APPEARANCE.contrast["blood"])
    real = data + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.power(np.sqrt(real * real + imag * imag), np.float32(protocol.gamma))


def to_stored(volume: FloatArray, protocol: Protocol) -> np.ndarray:
    """Scale a reconstructed volume to the vendor's non-negative int16 range."""
    top = float(np.percentile(volume, 99.8)) or 1.0
    return np.clip(np.rint(volume / top * protocol.intensity_max), 0, 32767).astype(np.int16)
