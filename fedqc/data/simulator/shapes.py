"""Signed-distance primitives (in mm) and smooth random fields the anatomy is built from.

Every shape is an approximate signed distance: negative inside, positive outside, in mm, so a
renderer can anti-alias edges (partial volume) by clipping ``0.5 - d / pixel_mm`` to [0, 1].
The approximations are exact on the surface and good to a few per cent near it, which is all
partial-volume rendering and label thresholding need. Arrays are float32 throughout.
"""

from __future__ import annotations

import numpy as np

from fedqc.core.types import FloatArray

_EPS = np.float32(1e-6)


def ellipsoid_sdf(x: FloatArray, y: FloatArray, z: FloatArray | None,
                  radii_mm: tuple[float, float, float] | tuple[float, float]) -> FloatArray:
    """Approximate signed distance to an axis-aligned ellipsoid (or ellipse) centred at 0.

    Args:
        x, y, z: coordinates in mm (``z=None`` gives an infinite elliptic cylinder along z).
        radii_mm: semi-axes along x, y (and z).

    Returns:
        Signed distance in mm, negative inside.
    """
    ax, ay = np.float32(radii_mm[0]), np.float32(radii_mm[1])
    k0 = (x / ax) ** 2 + (y / ay) ** 2
    k1 = (x / (ax * ax)) ** 2 + (y / (ay * ay)) ** 2
    if z is not None:
        az = np.float32(radii_mm[2])  # type: ignore[misc]
        k0 = k0 + (z / az) ** 2
        k1 = k1 + (z / (az * az)) ** 2
    k0 = np.sqrt(k0)
    return k0 * (k0 - 1.0) / (np.sqrt(k1) + _EPS)


def bullet_sdf(x: FloatArray, y: FloatArray, z: FloatArray, radii_mm: tuple[float, float],
               length_mm: float, cap_mm: float, taper: float = 0.0) -> FloatArray:
    """A ventricle-like bullet: elliptic cylinder open toward +z, ellipsoidal cap toward -z.

    The tip (apex) is at ``z = -length_mm``; the cap is ``cap_mm`` long; above it the section is
    constant apart from a linear ``taper`` (fractional narrowing from z=0 to the tip).

    Args:
        x, y, z: coordinates in mm.
        radii_mm: semi-axes of the cross-section (x, y).
        length_mm: distance from z=0 to the tip.
        cap_mm: length of the rounded cap (<= length_mm).
        taper: 0 keeps the section constant; 0.2 makes it 20 % narrower at the tip.
    """
    length = np.float32(length_mm)
    scale = 1.0 + np.float32(taper) * np.clip(z, -length, 0.0) / length
    zc = np.minimum(z + np.float32(length_mm - cap_mm), 0.0)
    d = ellipsoid_sdf(x / scale, y / scale, zc, (radii_mm[0], radii_mm[1], cap_mm))
    return d * scale


def capsule_sdf(x: FloatArray, y: FloatArray, z: FloatArray, start_mm: np.ndarray,
                end_mm: np.ndarray, radius_mm: float) -> FloatArray:
    """Exact signed distance to a capsule (segment ``start``-``end`` swept by a sphere)."""
    a = np.asarray(start_mm, dtype=np.float32)
    ba = np.asarray(end_mm, dtype=np.float32) - a
    px, py, pz = x - a[0], y - a[1], z - a[2]
    h = np.clip((px * ba[0] + py * ba[1] + pz * ba[2]) / np.float32(ba @ ba), 0.0, 1.0)
    return np.sqrt((px - h * ba[0]) ** 2 + (py - h * ba[1]) ** 2 + (pz - h * ba[2]) ** 2) - np.float32(radius_mm)


def smooth_max(a: FloatArray, b: FloatArray, k_mm: float) -> FloatArray:
    """Intersection of two SDFs with corners rounded over about ``k_mm``."""
    k = np.float32(k_mm)
    h = np.maximum(k - np.abs(a - b), 0.0)
    return np.maximum(a, b) + h * h / (4.0 * k)


def random_waves(rng: np.random.Generator, count: int, wavelength_mm: tuple[float, float],
                 amplitude: float) -> np.ndarray:
    """Random plane waves for :func:`wave_field`: rows ``(kx, ky, kz, phase, amplitude)``.

    Args:
        rng: random generator.
        count: number of waves.
        wavelength_mm: range the wavelengths are drawn from (log-uniform).
        amplitude: each wave's amplitude; the field's standard deviation is about
            ``amplitude * sqrt(count / 2)``.
    """
    direction = rng.normal(size=(count, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavelength = np.exp(rng.uniform(np.log(wavelength_mm[0]), np.log(wavelength_mm[1]), count))
    k = direction * (2 * np.pi / wavelength)[:, None]
    phase = rng.uniform(0, 2 * np.pi, count)
    return np.column_stack([k, phase, np.full(count, amplitude)]).astype(np.float32)


def wave_field(x: FloatArray, y: FloatArray, z: FloatArray, waves: np.ndarray) -> FloatArray:
    """Sum of plane waves ``a sin(k . p + phase)``: a smooth, band-limited random field in 3D."""
    out = np.zeros(np.broadcast(x, y, z).shape, dtype=np.float32)
    for kx, ky, kz, phase, amp in waves:
        out += amp * np.sin(kx * x + ky * y + kz * z + phase)
    return out


def inside_fraction(d_mm: FloatArray, width_mm: float) -> FloatArray:
    """Partial-volume fraction of a pixel of size ``width_mm`` inside an SDF (0 out, 1 in)."""
    return np.clip(0.5 - d_mm / np.float32(width_mm), 0.0, 1.0)
