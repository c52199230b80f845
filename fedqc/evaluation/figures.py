"""Figures of a run that people would rather look at than numbers: round logs of a federation.

Every function writes one PNG through :func:`fedqc.predict.overlay.save_png` and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from fedqc.predict.overlay import save_png


def lines_png(path: Path, series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str, title: str) -> Path:
    """Named series against their index (e.g. a round-by-round log)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return save_png(fig, path)


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
