"""Writing a simulated data set: M&Ms-2 NIfTI files, the metadata CSV and a preview picture.

Files are byte-for-byte reproducible: NIfTI files are gzipped with a zero timestamp and no name.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fedqc.core.types import Label

#: The M&Ms-2 columns first, then the simulator's own.
CSV_COLUMNS: tuple[str, ...] = (
    "SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD", "CENTRE",
    "SIM_LABELLED_INTENT", "SIM_SEVERITY", "SIM_DISEASE_SEVERITY", "SIM_PIXEL_SPACING_MM", "SIM_SLICE_SPACING_MM",
    "SIM_SA_SLICES", "SIM_SNR", "SIM_BLOOD_MYO_RATIO",
)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` (X, Y, Z) with ``affine`` as a reproducible ``.nii.gz``.

    The header carries the affine as both qform and sform (scanner coordinates) and mm units,
    so ``pixdim`` is the voxel spacing.
    """
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_slope_inter(1.0, 0.0)
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as gz:
        gz.write(image.to_bytes())


def write_metadata_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Write ``dataset_information.csv`` (comma separated, one row per subject)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


@dataclass(frozen=True)
class PreviewPanel:
    """One picture in the preview grid: a 2D image, its labels and a caption."""

    image: np.ndarray
    labels: np.ndarray
    caption: str


_CONTOURS = ((Label.LV, "#ff5050"), (Label.MYO, "#50ff50"), (Label.RV, "#ffd000"))


def write_preview(path: Path, rows: Sequence[tuple[str, Sequence[PreviewPanel]]]) -> None:
    """A grid (a row per centre) of slices with label contours (LV red, MYO green, RV yellow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.3 * n_cols, 2.5 * len(rows)), squeeze=False,
                             facecolor="black")
    for r, (title, panels) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(panels):
                continue
            panel = panels[c]
            lo, hi = np.percentile(panel.image, [0.5, 99.7])
            ax.imshow(panel.image.T, cmap="gray", vmin=lo, vmax=max(hi, lo + 1), interpolation="nearest")
            for value, colour in _CONTOURS:
                mask = panel.labels == value
                if mask.any():
                    ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.6)
            ax.set_title(panel.caption, fontsize=7, color="white")
        axes[r][0].text(-0.08, 0.5, title, transform=axes[r][0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=8, color="white")
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black", metadata={"Software": None})
    plt.close(fig)
