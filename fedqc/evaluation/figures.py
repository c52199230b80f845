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

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def lines_figure(series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str, title: str,
                 counts: bool = False) -> plt.Figure:
    """Named series against their index, 1-based (e.g. a round-by-round log).

    Whole-number x ticks (rounds); each series its own marker and line style, drawn a little to the
    side of the others when there are several, so equal values never hide one series under another.
    ``counts``: the y axis starts at 0 with whole-number ticks (cases, sites).
    """
    fig, ax = plt.subplots(figsize=(5, 3.2))
    n = len(series)
    width = 0.12 if n > 1 else 0.0  # a round's points spread over +-width
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (n - 1) / 2) * (2 * width / max(n - 1, 1)) if n > 1 else 0.0
        ax.plot(np.arange(1, len(values) + 1) + offset, values, marker=MARKERS[i % len(MARKERS)], ms=4,
                linestyle=LINESTYLES[(i // len(MARKERS)) % len(LINESTYLES)], label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    if counts:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        top = max([float(v) for values in series.values() for v in values] + [0.0])
        ax.set_ylim(0, max(1.0, top * 1.08))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if n > 1:
        ax.legend(fontsize=7)
    return fig


def lines_png(path: Path, series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str, title: str,
              counts: bool = False) -> Path:
    """:func:`lines_figure` written as a PNG."""
    return save_png(lines_figure(series, xlabel, ylabel, title, counts=counts), path)


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
                             "flagged cases", "OoD-flagged cases per site", counts=True))
        out.append(lines_png(run_dir / "plots" / "alpha.png", {"alpha": [r.get("alpha", 0.0) for r in ref]},
                             "refine round", "alpha", "weight of the semi-supervised term"))
    return out
