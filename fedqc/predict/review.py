"""The QC review page: ``qc.html`` beside ``qc.csv``, for a clinician to open in a browser.

One self-contained HTML file (no network: every image is an embedded PNG, the style is inline and
a Content-Security-Policy forbids anything else):

* a summary line: cases, flagged (out of distribution), failed;
* the cases that could not be predicted, each with its reason;
* per view, the fences drawn on the pDC and pHD histograms (and on pTC's, where the cases have it);
* per view, pDC against Dice where labels exist (predict with labels, or ``fedqc evaluate``);
* every case, flagged ones first, then by pDC from the lowest: id, pDC, pHD, pTC, the selected
  candidate, Dice where known, and its overlay (image, prediction, QC reconstruction).

Built from the ``qc.csv`` rows and the ``review/<case_id>.png`` thumbnails that
:func:`fedqc.predict.folder.predict_cases` writes, so ``fedqc evaluate`` can rebuild it with Dice.
Written atomically through :mod:`fedqc.core.io`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedqc.core.io import atomic_write  # noqa: E402
from fedqc.predict.overlay import png_bytes  # noqa: E402

PAGE = "qc.html"
REVIEW = "review"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.6em; }
p.summary { font-size: 1.1em; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
tr.flagged td { background: #fdecea; }
span.flag { color: #fff; background: #c62828; border-radius: 3px; padding: 1px 6px; font-weight: bold; }
span.ok { color: #2e7d32; }
img.overlay { height: 150px; display: block; }
img.plot { max-width: 100%; display: block; }
figure { display: inline-block; margin: 0 1em 1em 0; }
td.error { color: #b71c1c; font-family: monospace; white-space: pre-wrap; }
"""


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _flagged(row: Mapping) -> bool:
    return str(row.get("ood")) == "True"


def review_order(rows: Sequence[Mapping]) -> list[Mapping]:
    """The predicted cases as the page lists them: flagged first, then by pDC from the lowest."""
    predicted = [r for r in rows if not r.get("error")]
    return sorted(predicted, key=lambda r: (not _flagged(r), _number(r.get("pdc")) is None,
                                            _number(r.get("pdc")) or 0.0, str(r["case_id"])))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _values(rows: Sequence[Mapping], key: str) -> list[float]:
    return [v for v in (_number(r.get(key)) for r in rows) if v is not None]


def _fences_png(view: str, rows: Sequence[Mapping]) -> bytes:
    """pDC and pHD histograms of one view's cases with the fences drawn on them, and pTC's where the
    cases have it (``qc.consistency``)."""
    low = next(iter(_values(rows, "th_low_pdc")), None)
    up = next(iter(_values(rows, "th_up_phd")), None)
    panels = [(_values(rows, "pdc"), low, "pDC", "lower fence"),
              (_values(rows, "phd_mm"), up, "pHD (mm)", "upper fence")]
    if _values(rows, "ptc"):
        panels.append((_values(rows, "ptc"), next(iter(_values(rows, "th_low_ptc")), None), "pTC", "lower fence"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 2.8))
    for ax, (values, fence, name, side) in zip(axes, panels):
        ax.hist(values, bins=max(5, min(30, len(values) // 2 or 1)), color="#90a4ae", edgecolor="#455a64")
        if fence is not None:
            ax.axvline(fence, color="#c62828", linestyle="--", linewidth=2, label=f"{side} {fence:.3g}")
            ax.legend(fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel("cases")
        ax.yaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{view}: {len(rows)} cases, {sum(map(_flagged, rows))} flagged", fontsize=10)
    return png_bytes(fig, dpi=80)


def _dice_png(view: str, rows: Sequence[Mapping]) -> bytes | None:
    """pDC against Dice (cases with a label), flagged ones in red, the pDC fence drawn."""
    points = [(_number(r.get("pdc")), _number(r.get("dice")), _flagged(r)) for r in rows]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if not points:
        return None
    low = next(iter(_values(rows, "th_low_pdc")), None)
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    for flagged, colour, name in ((False, "#1565c0", "in distribution"), (True, "#c62828", "flagged")):
        xs = [p[0] for p in points if p[2] == flagged]
        ys = [p[1] for p in points if p[2] == flagged]
        if xs:
            ax.scatter(xs, ys, s=18, color=colour, label=name, marker="o" if not flagged else "^")
    if low is not None:
        ax.axvline(low, color="#c62828", linestyle="--", linewidth=1.5, label="pDC fence")
    ax.set_xlabel("pDC (QC estimate)")
    ax.set_ylabel("Dice against the label")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"{view}: pDC vs Dice ({len(points)} labelled cases)", fontsize=10)
    return png_bytes(fig, dpi=80)


def _fmt(value, digits: int) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.{digits}f}"


def review_html(rows: Sequence[Mapping], thumbnails: Mapping[str, bytes], title: str, note: str = "") -> str:
    """The page for ``rows`` (qc.csv rows) with each case's ``thumbnails`` PNG (by case id)."""
    esc = html.escape
    predicted = review_order(rows)
    failed = [r for r in rows if r.get("error")]
    flagged = sum(1 for r in predicted if _flagged(r))
    parts = [(f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
              f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
              f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"),
             f"<h1>{esc(title)}</h1>",
             (f"<p class=\"summary\" id=\"summary\">{len(rows)} cases: <strong>{flagged} flagged</strong> as out "
              f"of distribution, {len(predicted) - flagged} within the fences, {len(failed)} could not be "
              "predicted.</p>"),
             ("<p>A case is flagged when its pDC (the QC autoencoder's estimate of the Dice of the prediction) "
              "is below the lower fence or its pHD (estimated Hausdorff distance, mm) above the upper fence, "
              "or, where it is scored, its pTC (how much the segmenter agrees with itself on the same image "
              "flipped and with another contrast; 1: fully) below its fence: a low pTC means the segmenter is "
              "unsure of this image even when the mask's shape looks plausible. "
              "Flagged cases come first, then every case by pDC from the lowest: review those first. Each "
              "overlay shows the image, the prediction and the QC reconstruction of one slice.</p>")]
    if note:
        parts.append(f"<p class=\"note\">{esc(note)}</p>")
    if failed:
        parts.append("<h2 id=\"failed\">Cases that could not be predicted</h2><table class=\"failed\">"
                     "<thead><tr><th>case</th><th>reason</th></tr></thead><tbody>")
        parts += [f"<tr class=\"failed\" data-case=\"{esc(str(r['case_id']))}\"><td>{esc(str(r['case_id']))}</td>"
                  f"<td class=\"error\">{esc(str(r['error']))}</td></tr>" for r in failed]
        parts.append("</tbody></table>")
    views = sorted({str(r["view"]) for r in predicted})
    if views:
        parts.append("<h2 id=\"fences\">Fences</h2>")
        for view in views:
            of_view = [r for r in predicted if str(r["view"]) == view]
            parts.append(f"<figure><img class=\"plot\" data-plot=\"fences-{esc(view)}\" alt=\"pDC and pHD "
                         f"histograms of the {esc(view)} cases with their fences\" "
                         f"src=\"{_data_uri(_fences_png(view, of_view))}\"></figure>")
        scatters = [(view, _dice_png(view, [r for r in predicted if str(r["view"]) == view])) for view in views]
        scatters = [(view, png) for view, png in scatters if png is not None]
        if scatters:
            parts.append("<h2 id=\"dice\">pDC against Dice (cases with a label)</h2>")
            parts += [f"<figure><img class=\"plot\" data-plot=\"dice-{esc(view)}\" alt=\"pDC against Dice, "
                      f"{esc(view)}\" src=\"{_data_uri(png)}\"></figure>" for view, png in scatters]
    parts.append("<h2 id=\"cases-title\">Cases</h2><table id=\"cases\"><thead><tr><th>#</th><th>case</th>"
                 "<th>view</th><th>phase</th><th>QC</th><th>pDC</th><th>pHD mm</th><th>pTC</th><th>selected</th>"
                 "<th>Dice</th>"
                 "<th>image | prediction | QC reconstruction</th></tr></thead><tbody>")
    for rank, row in enumerate(predicted, 1):
        case = esc(str(row["case_id"]))
        is_flagged = _flagged(row)
        png = thumbnails.get(str(row["case_id"]))
        image = (f"<img class=\"overlay\" alt=\"overlay of {case}\" src=\"{_data_uri(png)}\">" if png
                 else "<span class=\"missing\">no overlay</span>")
        badge = "<span class=\"flag\">flagged</span>" if is_flagged else "<span class=\"ok\">ok</span>"
        parts.append(f"<tr class=\"case{' flagged' if is_flagged else ''}\" id=\"case-{case}\" data-case=\"{case}\" "
                     f"data-flagged=\"{str(is_flagged).lower()}\"><td>{rank}</td><td>{case}</td>"
                     f"<td>{esc(str(row['view']))}</td><td>{esc(str(row['phase']))}</td><td>{badge}</td>"
                     f"<td>{_fmt(row.get('pdc'), 3)}</td><td>{_fmt(row.get('phd_mm'), 1)}</td>"
                     f"<td>{_fmt(row.get('ptc'), 3)}</td>"
                     f"<td>{esc(str(row.get('selected', '')))}</td><td>{_fmt(row.get('dice'), 3)}</td>"
                     f"<td>{image}</td></tr>")
    parts.append("</tbody></table></body></html>\n")
    return "\n".join(parts)


def write_review(folder: Path, rows: Sequence[Mapping], title: str, dice: Mapping[str, float] | None = None,
                 note: str = "") -> Path:
    """Write ``folder/qc.html`` for ``rows``, embedding ``folder/review/<case_id>.png``.

    ``dice``: Dice per case id (``fedqc evaluate``), replacing the rows' own ``dice`` column.
    """
    folder = Path(folder)
    if dice is not None:
        rows = [{**r, "dice": dice.get(str(r["case_id"]), r.get("dice", ""))} for r in rows]
    thumbnails = {}
    for row in rows:
        path = folder / REVIEW / f"{row['case_id']}.png"
        if not row.get("error") and path.is_file():
            thumbnails[str(row["case_id"])] = path.read_bytes()
    return atomic_write(folder / PAGE, review_html(rows, thumbnails, title, note))
