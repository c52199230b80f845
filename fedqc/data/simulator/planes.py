"""Where the scanner puts its slices: the short-axis stack and the four-chamber plane.

Planned the way a technologist plans them: the SA stack perpendicular to the long axis from just
above the mitral valve toward (and sometimes not quite to, sometimes past) the apex, anterior up
and RV on the left; the four-chamber plane through the long axis and the RV, apex up. Both get a
per-subject in-plane rotation and an off-centre field of view. The NIfTI affine is the plane's true
world geometry, so its column norms are the pixel spacing and slice spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedqc.data.simulator.anatomy import SubjectAnatomy


@dataclass(frozen=True)
class SlicePlane:
    """One acquired slice: pixel (i, j) is at ``origin + i*dx*axis_x + j*dy*axis_y`` (world mm)."""

    origin_mm: np.ndarray
    axis_x: np.ndarray
    axis_y: np.ndarray
    spacing_mm: tuple[float, float]
    shape: tuple[int, int]
    thickness_mm: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.axis_x, self.axis_y)

    def points(self, offset_mm: float = 0.0, box: tuple[slice, slice] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates (float32 x, y, z arrays) of pixel centres, shifted ``offset_mm`` along the normal."""
        box = box or (slice(0, self.shape[0]), slice(0, self.shape[1]))
        i = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] * np.float32(self.spacing_mm[0])
        j = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] * np.float32(self.spacing_mm[1])
        base = (self.origin_mm + offset_mm * self.normal).astype(np.float32)
        ax, ay = self.axis_x.astype(np.float32), self.axis_y.astype(np.float32)
        return tuple(base[k] + i * ax[k] + j * ay[k] for k in range(3))  # type: ignore[return-value]

    def pixel_of(self, point_mm: np.ndarray) -> tuple[float, float]:
        """Fractional pixel indices of the projection of a world point onto the plane."""
        rel = point_mm - self.origin_mm
        return float(rel @ self.axis_x / self.spacing_mm[0]), float(rel @ self.axis_y / self.spacing_mm[1])


@dataclass(frozen=True)
class StackGeometry:
    """What the protocol fixes about the slices (sampled per subject by :mod:`.scanner`)."""

    spacing_mm: tuple[float, float]
    shape: tuple[int, int]
    slice_thickness_mm: float
    slice_gap_mm: float
    n_slices: tuple[int, int]
    la_thickness_mm: float


def _rotate_in_plane(a: np.ndarray, b: np.ndarray, angle_rad: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return c * a + s * b, -s * a + c * b


def _origin(centre: np.ndarray, ex: np.ndarray, ey: np.ndarray, geometry: StackGeometry) -> np.ndarray:
    (dx, dy), (nx, ny) = geometry.spacing_mm, geometry.shape
    return centre - ex * dx * (nx - 1) / 2 - ey * dy * (ny - 1) / 2


def sa_stack(anatomy: SubjectAnatomy, geometry: StackGeometry, rng: np.random.Generator
             ) -> tuple[list[SlicePlane], np.ndarray]:
    """The short-axis planes (base first) and their NIfTI affine; the same for ED and ES."""
    origin_ed, rotation = anatomy.frame("ED")
    u, w = rotation[:, 0], rotation[:, 2]
    anterior = np.array([0.0, 1.0, 0.0]) - w[1] * w
    ey = -anterior / np.linalg.norm(anterior)
    ex = np.cross(w, ey)
    ex = -ex if ex @ u > 0 else ex  # RV on the left
    ex, ey = _rotate_in_plane(ex, ey, rng.uniform(-0.35, 0.35))

    length = anatomy.ed.lv_length_mm
    first_mm = rng.uniform(-6.0, 8.0)  # above the mitral-plane centre when positive
    step = geometry.slice_thickness_mm + geometry.slice_gap_mm
    coverage = length + first_mm + rng.uniform(-8.0, 8.0)
    n_lo, n_hi = geometry.n_slices
    n = int(np.clip(round(coverage / step) + 1, n_lo, n_hi))
    if (n - 1) * step < coverage - step:  # too few slices allowed: widen the gap, as a technologist would
        step = coverage / max(n - 1, 1)
    in_plane = 12.0 * u + rng.uniform(-8, 8) * ex + rng.uniform(-8, 8) * ey
    in_plane -= (in_plane @ w) * w
    planes = []
    for k in range(n):
        centre = origin_ed + (first_mm - k * step) * w + in_plane
        planes.append(SlicePlane(_origin(centre, ex, ey, geometry), ex, ey, geometry.spacing_mm,
                                 geometry.shape, geometry.slice_thickness_mm))
    affine = np.eye(4)
    affine[:3, 0] = ex * geometry.spacing_mm[0]
    affine[:3, 1] = ey * geometry.spacing_mm[1]
    affine[:3, 2] = -w * step
    affine[:3, 3] = planes[0].origin_mm
    return planes, affine


def la_plane(anatomy: SubjectAnatomy, geometry: StackGeometry, rng: np.random.Generator
             ) -> tuple[SlicePlane, np.ndarray]:
    """The four-chamber plane (apex up, RV on the left) and its NIfTI affine."""
    origin_ed, rotation = anatomy.frame("ED")
    u, v, w = rotation[:, 0], rotation[:, 1], rotation[:, 2]
    # Planned by eye: the plane is turned a little about the long axis and tilted in itself.
    turn = rng.uniform(-0.3, 0.3)
    across = np.cos(turn) * u + np.sin(turn) * v
    ex, ey = _rotate_in_plane(-across, w, rng.uniform(-0.25, 0.25))
    length = anatomy.ed.lv_length_mm
    centre = (origin_ed - (0.38 * length) * w + rng.uniform(4, 16) * u + rng.uniform(-6, 6) * v
              + rng.uniform(-8, 8) * ex + rng.uniform(-8, 8) * ey)
    plane = SlicePlane(_origin(centre, ex, ey, geometry), ex, ey, geometry.spacing_mm, geometry.shape,
                       geometry.la_thickness_mm)
    affine = np.eye(4)
    affine[:3, 0] = ex * geometry.spacing_mm[0]
    affine[:3, 1] = ey * geometry.spacing_mm[1]
    affine[:3, 2] = plane.normal * geometry.la_thickness_mm
    affine[:3, 3] = plane.origin_mm
    return plane, affine
