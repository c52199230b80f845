"""The overlay PNG of a flagged case: image, prediction and QC reconstruction (the paper's Fig. 4).

matplotlib runs headless (Agg); every PNG is written atomically through :mod:`fedqc.core.io`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from fedqc.core.io import atomic_write  # noqa: E402

LABEL_CMAP = ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.55), (0.2, 0.8, 0.2, 0.55), (0.2, 0.4, 1.0, 0.6)])


def save_png(fig: plt.Figure, path: Path, dpi: int = 110) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)


def png_bytes(fig: plt.Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (for embedding in a page), then closed."""
    import io

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _middle_slice(stack: np.ndarray, labels: np.ndarray | None) -> int:
    """The slice with most foreground (else the middle one) of a (Z, H, W) stack."""
    if labels is not None and labels.any():
        return int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(1)))
    return stack.shape[0] // 2


def overlay_png(path: Path, images: np.ndarray, prediction: np.ndarray, reconstruction: np.ndarray,
                title: str, dpi: int = 110) -> Path:
    """Image, prediction and QC reconstruction side by side (the paper's Fig. 4), one slice.

    Args:
        images: (Z, H, W) network-grid image stack.
        prediction: (Z, H, W) labels predicted by the segmenter.
        reconstruction: (Z, H, W) labels of the QC autoencoder's reconstruction.
        dpi: resolution (the QC review page's thumbnails use less).
    """
    k = _middle_slice(images, prediction)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, overlay, name in zip(axes, (None, prediction, reconstruction), ("image", "prediction", "QC reconstruction")):
        ax.imshow(images[k].T, cmap="gray", origin="lower")
        if overlay is not None:
            ax.imshow(overlay[k].T, cmap=LABEL_CMAP, vmin=0, vmax=3, origin="lower", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title} (slice {k})", fontsize=10)
    return save_png(fig, path, dpi=dpi)


