"""Figures people would rather look at than numbers: overlays, pDC-vs-Dice scatter, histograms.

Every function writes one PNG (atomically: temp file then rename) and returns its path.
matplotlib runs headless (Agg).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

LABEL_CMAP = ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.55), (0.2, 0.8, 0.2, 0.55), (0.2, 0.4, 1.0, 0.6)])


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _middle_slice(stack: np.ndarray, labels: np.ndarray | None) -> int:
    """The slice with most foreground (else the middle one) of a (Z, H, W) stack."""
    if labels is not None and labels.any():
        return int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(1)))
    return stack.shape[0] // 2


def overlay_png(path: Path, images: np.ndarray, prediction: np.ndarray, reconstruction: np.ndarray,
                title: str) -> Path:
    """Image, prediction and QC reconstruction side by side (the paper's Fig. 4), one slice.

    Args:
        images: (Z, H, W) network-grid image stack.
        prediction: (Z, H, W) labels predicted by the segmenter.
        reconstruction: (Z, H, W) labels of the QC autoencoder's reconstruction.
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
    return _save(fig, path)


def scatter_png(path: Path, x: Sequence[float], y: Sequence[float], groups: Sequence[str], xlabel: str,
                ylabel: str, title: str, diagonal: bool = False) -> Path:
    """A scatter plot coloured by group (e.g. pDC vs true Dice per site)."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    x, y = np.asarray(x, float), np.asarray(y, float)
    for group in sorted(set(groups)):
        mask = np.array([g == group for g in groups])
        ax.scatter(x[mask], y[mask], s=12, alpha=0.7, label=group)
    if diagonal:
        lo, hi = np.nanmin([x.min(), y.min()]), np.nanmax([x.max(), y.max()])
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def threshold_histograms_png(path: Path, pdc: Sequence[float], phd: Sequence[float], th_low_pdc: float,
                             th_up_phd: float, title: str) -> Path:
    """Histograms of a site's pDC and pHD with its Tukey fences marked."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, values, fence, name in ((axes[0], pdc, th_low_pdc, "pDC"), (axes[1], phd, th_up_phd, "pHD (mm)")):
        ax.hist(np.asarray(values, float), bins=20, color="0.6")
        ax.axvline(fence, color="r", ls="--", label=f"fence {fence:.3g}")
        ax.set_xlabel(name)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def lines_png(path: Path, series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str, title: str) -> Path:
    """Named series against their index (e.g. a round-by-round log)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (readable in a terminal too)."""

    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def round_log_pngs(run_dir: Path) -> list[Path]:
    """Plots of a federated run's ``log.json``: validation Dice, flagged cases per site, alpha."""
    import json

    rows = json.loads((run_dir / "log.json").read_text())
    out = []
    sup = [r for r in rows if r["phase"] in ("supervised", "supervised-evaluate") and "val_score" in r]
    if sup:
        out.append(lines_png(run_dir / "plots" / "global_val_dice.png",
                             {"weighted mean val Dice": [r["val_score"] for r in sup]},
                             "supervised round", "Dice", "global segmenter: federated validation Dice"))
    ref = [r for r in rows if r["phase"] == "refine"]
    if ref:
        sites = sorted({s for r in ref for s in r["sites"]})
        flagged = {s: [r["sites"].get(s, {}).get("metrics", {}).get("num-flagged", 0) for r in ref] for s in sites}
        out.append(lines_png(run_dir / "plots" / "flagged_per_site.png", flagged, "refine round",
                             "flagged cases", "OoD-flagged cases per site"))
        out.append(lines_png(run_dir / "plots" / "alpha.png", {"alpha": [r.get("alpha", 0.0) for r in ref]},
                             "refine round", "alpha", "weight of the semi-supervised term"))
    return out
