"""Invertible preprocessing: in-plane resampling, crop/pad to a square and intensity normalisation.

The forward map goes from an (X, Y, Z) volume to (Z, size, size) slices: output ``[k, i, j]``
samples original voxel ``(x, y, k)`` with, per in-plane axis ``a``,

    x_a = (i_a + start_a - centre_resampled_a) * zoom_a + centre_original_a,
    zoom_a = target_spacing_mm / spacing_mm_a,

i.e. one interpolation from the original grid straight into the crop (Z is never resampled). The
resampled grid has ``round(n_a / zoom_a)`` pixels sharing the original grid's centre, and the
crop starts at integer ``start_a`` on it (negative means padding). :class:`Geometry` records these
numbers so :func:`restore_probabilities` can map predictions back exactly onto the original grid.
Output axis 1 is X and axis 2 is Y: ``slices[k]`` is ``array[:, :, k]`` resampled, not transposed.
The inverse maps (``restore_*``) live in :mod:`fedqc.data.restore`, re-exported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import ndimage

from fedqc.core.errors import ConfigError
from fedqc.core.types import NUM_CLASSES, FloatArray, LabelArray
from fedqc.data.restore import restore_labels, restore_probabilities

if TYPE_CHECKING:
    from fedqc.data.nifti import Volume

_SAME_SPACING_RTOL = 1e-3  # closer than this to the target: keep the grid, avoid a blur


@dataclass(frozen=True)
class PreprocessSpec:
    """How to bring a volume to the network's input grid.

    Attributes:
        spacing_mm: in-plane target pixel size.
        size_px: side of the square output slices.
        crop: ``"centre"`` crops around the image centre; ``"heart"`` asks the caller to pass a
            heart centre (see :func:`crop_centre_px`), e.g. from the label in training.
        normalise: ``"zscore"`` (mean 0, std 1 over the volume) or ``"percentile"`` (clip to the
            1st..99th percentile, scale to 0..1).
    """

    spacing_mm: float = 1.25
    size_px: int = 128
    crop: Literal["centre", "heart"] = "centre"
    normalise: Literal["zscore", "percentile"] = "zscore"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.spacing_mm) and self.spacing_mm > 0):
            raise ConfigError("preprocess.spacing_mm", f"must be positive, got {self.spacing_mm}")
        if isinstance(self.size_px, bool) or not isinstance(self.size_px, int) or self.size_px < 8:
            raise ConfigError("preprocess.size_px", f"must be an integer >= 8, got {self.size_px}")
        if self.crop not in ("centre", "heart"):
            raise ConfigError("preprocess.crop", f"'{self.crop}' is not 'centre' or 'heart'")
        if self.normalise not in ("zscore", "percentile"):
            raise ConfigError(
                "preprocess.normalise", f"'{self.normalise}' is not 'zscore' or 'percentile'"
            )


@dataclass(frozen=True)
class Geometry:
    """Everything :func:`restore_probabilities` needs to undo :func:`preprocess_image`.

    Attributes:
        original_shape: (X, Y, Z) of the original volume.
        zoom: (X, Y) original pixels per output pixel (target spacing / original spacing).
        resampled_shape: (X, Y) size of the full resampled in-plane grid.
        crop_start_px: (X, Y) first resampled pixel of the crop; negative means padding.
        size_px: side of the square output.
        centre_px: (x, y) crop centre in original pixel coordinates.
    """

    original_shape: tuple[int, int, int]
    zoom: tuple[float, float]
    resampled_shape: tuple[int, int]
    crop_start_px: tuple[int, int]
    size_px: int
    centre_px: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists and numbers)."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: when a field is missing or malformed.
        """
        def numbers(key: str, kind: type, length: int) -> tuple:
            values = tuple(kind(v) for v in data[key])
            if len(values) != length:
                raise ValueError(f"{key} needs {length} numbers")
            return values

        try:
            return cls(
                original_shape=numbers("original_shape", int, 3),
                zoom=numbers("zoom", float, 2),
                resampled_shape=numbers("resampled_shape", int, 2),
                crop_start_px=numbers("crop_start_px", int, 2),
                size_px=int(data["size_px"]),
                centre_px=numbers("centre_px", float, 2),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed geometry {data!r}: {exc}") from exc

    def output_to_original_px(self, axis: int) -> tuple[float, float]:
        """(scale, offset) with original index = scale * output index + offset along ``axis``."""
        n, zoom = self.original_shape[axis], self.zoom[axis]
        centre_resampled = (self.resampled_shape[axis] - 1) / 2
        offset = (self.crop_start_px[axis] - centre_resampled) * zoom + (n - 1) / 2
        return zoom, offset


def plan_geometry(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    spec: PreprocessSpec,
    centre_px: tuple[float, float] | None = None,
) -> Geometry:
    """Decide the resampled grid and crop for a volume, without touching voxels.

    Args:
        shape: (X, Y, Z) of the volume.
        spacing_mm: its voxel size.
        spec: the preprocessing.
        centre_px: crop centre in original pixel coordinates; None means the image centre.

    Returns:
        The :class:`Geometry` that :func:`preprocess_image` and the inverse use.
    """
    zooms, resampled, starts = [], [], []
    centre = centre_px if centre_px is not None else ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    for axis in (0, 1):
        zoom = spec.spacing_mm / spacing_mm[axis]
        if abs(zoom - 1.0) < _SAME_SPACING_RTOL:
            zoom = 1.0
        n_resampled = max(1, int(round(shape[axis] / zoom)))
        centre_resampled = (centre[axis] - (shape[axis] - 1) / 2) / zoom + (n_resampled - 1) / 2
        start = int(np.floor(centre_resampled - (spec.size_px - 1) / 2 + 0.5))
        zooms.append(zoom), resampled.append(n_resampled), starts.append(start)
    return Geometry(
        original_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        zoom=(zooms[0], zooms[1]),
        resampled_shape=(resampled[0], resampled[1]),
        crop_start_px=(starts[0], starts[1]),
        size_px=spec.size_px,
        centre_px=(float(centre[0]), float(centre[1])),
    )


def preprocess_image(
    volume: Volume, spec: PreprocessSpec, centre_px: tuple[float, float] | None = None
) -> tuple[FloatArray, Geometry]:
    """Resample in-plane (cubic), crop/pad and normalise a volume into network input slices.

    Args:
        volume: the image; only its ``array`` (X, Y, Z) and ``spacing_mm`` are used.
        spec: the preprocessing.
        centre_px: crop centre (x, y) in original pixel coordinates, e.g. from
            :func:`crop_centre_px`; None crops around the image centre.

    Returns:
        float32 slices (Z, size, size) and the :class:`Geometry` to undo it. Normalisation
        statistics come from the whole original volume; pixels outside the field of view get the
        normalised value of the volume's minimum. A constant volume gives zeros.
    """
    array = np.asarray(volume.array, dtype=np.float32)
    geometry = plan_geometry(array.shape, volume.spacing_mm, spec, centre_px)
    normalised, background = _normalise(array, spec.normalise)
    slices = _to_output(normalised, geometry, order=3, cval=background)
    return slices.astype(np.float32), geometry


def preprocess_label(labels: np.ndarray, geometry: Geometry) -> LabelArray:
    """Bring an (X, Y, Z) label map onto the output grid of the matching image.

    Linear interpolation of the one-hot map then argmax, as for predictions in
    :func:`restore_probabilities`: unlike nearest neighbour it does not alias thin structures
    (the myocardium) when downsampling, and at equal spacing it reproduces labels exactly.

    Args:
        labels: integer labels in 0..3 shaped like the original image.
        geometry: from :func:`preprocess_image` on that image.

    Returns:
        uint8 labels (Z, size, size); outside the field of view is background.

    Raises:
        ValueError: if ``labels`` does not match the geometry or holds values outside 0..3.
    """
    labels = np.asarray(labels)
    if labels.shape != geometry.original_shape:
        raise ValueError(f"labels shape {labels.shape} != geometry {geometry.original_shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"label values must lie in 0..{NUM_CLASSES - 1}")
    one_hot = np.stack([(labels == c).astype(np.float32) for c in range(NUM_CLASSES)])
    probs = np.stack([
        _to_output(one_hot[c], geometry, order=1, cval=float(c == 0)) for c in range(NUM_CLASSES)
    ], axis=1)
    return np.argmax(probs, axis=1).astype(np.uint8)


def heart_centre_px(labels: np.ndarray) -> tuple[float, float] | None:
    """In-plane centre of mass (x, y) of all foreground voxels, in pixel coordinates.

    Args:
        labels: (X, Y, Z) label map.

    Returns:
        The centre, or None when there is no foreground.
    """
    foreground = np.asarray(labels) > 0
    if not foreground.any():
        return None
    x, y, _ = ndimage.center_of_mass(foreground)
    return float(x), float(y)


def crop_centre_px(spec: PreprocessSpec, labels: np.ndarray | None) -> tuple[float, float] | None:
    """The ``centre_px`` to pass to :func:`preprocess_image` under ``spec.crop``.

    Args:
        spec: the preprocessing.
        labels: the case's labels, if any.

    Returns:
        The heart centre for ``crop="heart"`` when labels with foreground are given, else None
        (the image centre: ``"centre"`` mode, or unlabelled data at inference).
    """
    if spec.crop == "heart" and labels is not None:
        return heart_centre_px(labels)
    return None


def _normalise(array: np.ndarray, method: str) -> tuple[np.ndarray, float]:
    """Normalised volume and the normalised value of its minimum (the padding value)."""
    if method == "zscore":
        mean, std = float(array.mean(dtype=np.float64)), float(array.std(dtype=np.float64))
        if std < 1e-8 * max(1.0, abs(mean)):
            return np.zeros_like(array), 0.0
        return (array - mean) / std, (float(array.min()) - mean) / std
    low, high = (float(v) for v in np.percentile(array, [1.0, 99.0]))
    if high - low < 1e-8 * max(1.0, abs(high)):
        return np.zeros_like(array), 0.0
    return (np.clip(array, low, high) - low) / (high - low), 0.0


def _to_output(array: np.ndarray, geometry: Geometry, order: int, cval: float) -> np.ndarray:
    """Sample each (X, Y) slice of ``array`` onto the output grid, giving (Z, size, size)."""
    (sx, ox), (sy, oy) = geometry.output_to_original_px(0), geometry.output_to_original_px(1)
    size = geometry.size_px
    out = np.empty((array.shape[2], size, size), dtype=np.float32)
    for k in range(array.shape[2]):
        out[k] = ndimage.affine_transform(
            array[:, :, k].astype(np.float32), np.array([sx, sy]), np.array([ox, oy]),
            output_shape=(size, size), order=order, mode="grid-constant", cval=cval,
        )
    return out


__all__ = [
    "Geometry", "PreprocessSpec", "crop_centre_px", "heart_centre_px", "plan_geometry",
    "preprocess_image", "preprocess_label", "restore_labels", "restore_probabilities",
]
