"""Inverse of :mod:`fedqc.data.preprocess`: network-grid predictions back onto the original grid.

:func:`restore_probabilities` pads the ``(Z, C, size, size)`` crop with background probability 1,
resamples it linearly back to the original (X, Y) pixels with the :class:`Geometry` recorded by
:func:`fedqc.data.preprocess.preprocess_image`, and takes the argmax there; :func:`restore_labels`
does the same for labels via their one-hot encoding. Re-exported by :mod:`fedqc.data.preprocess`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from fedqc.core.types import NUM_CLASSES, LabelArray

if TYPE_CHECKING:
    from fedqc.data.preprocess import Geometry


def restore_probabilities(probs: np.ndarray, geometry: Geometry) -> LabelArray:
    """Map class probabilities (Z, C, size, size) back to labels on the original (X, Y, Z) grid.

    The crop is padded with background probability 1 outside, resampled linearly back to the
    original pixels, and the argmax taken there.

    Args:
        probs: per-class probabilities (or any scores averaging sensibly), class 0 = background.
        geometry: from :func:`fedqc.data.preprocess.preprocess_image` on the image they were
            predicted from.

    Returns:
        uint8 labels shaped ``geometry.original_shape``.

    Raises:
        ValueError: if ``probs`` is not shaped (Z, C, size, size) for this geometry.
    """
    probs = np.asarray(probs, dtype=np.float32)
    size, n_z = geometry.size_px, geometry.original_shape[2]
    if probs.ndim != 4 or probs.shape[0] != n_z or probs.shape[2:] != (size, size):
        raise ValueError(f"probabilities shape {probs.shape} != ({n_z}, C, {size}, {size})")
    (sx, ox), (sy, oy) = geometry.output_to_original_px(0), geometry.output_to_original_px(1)
    # inverse map: output index = (original index - offset) / scale
    matrix, offset = np.array([1 / sx, 1 / sy]), np.array([-ox / sx, -oy / sy])
    out_shape = geometry.original_shape[:2]
    best = np.zeros(geometry.original_shape, dtype=np.uint8)
    for k in range(n_z):
        restored = np.stack([
            ndimage.affine_transform(
                probs[k, c], matrix, offset, output_shape=out_shape, order=1,
                mode="grid-constant", cval=float(c == 0),
            )
            for c in range(probs.shape[1])
        ])
        best[:, :, k] = np.argmax(restored, axis=0)
    return best


def restore_labels(labels: np.ndarray, geometry: Geometry) -> LabelArray:
    """Map output-grid labels (Z, size, size) back to (X, Y, Z), via their one-hot encoding.

    Args:
        labels: integer labels in 0..3 on the output grid.
        geometry: from :func:`fedqc.data.preprocess.preprocess_image`.

    Returns:
        uint8 labels shaped ``geometry.original_shape``.
    """
    labels = np.asarray(labels)
    one_hot = np.stack([(labels == c) for c in range(NUM_CLASSES)], axis=1).astype(np.float32)
    return restore_probabilities(one_hot, geometry)
