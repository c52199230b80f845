"""The peers side by side (docs/RESULTS.md): fedqc's variants and the label-free peers per view and site.

From the ablation's per-seed results (``run_seed`` entries with peers, ``adapt.peers``):
* one table per view, method x site: RV Dice and HD (mm), mean ± spread (population std) over
  seeds of each seed's site mean, and the gap closed toward the upper bound;
* a paired test over cases (Wilcoxon signed-rank, ``scipy.stats.wilcoxon``) of ``full`` against
  the strongest peer (highest mean Dice) at each shifted centre: each case's RV Dice averaged over
  the seeds whose test split held it, so a case counts once;
* each method's compute per site (seconds) beside its Dice gain over M;
* a PNG: Dice per method per site with the seeds' spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from fedqc.config import Config
from fedqc.evaluation.variants import PEERS

METHODS = ("M", "{M}+QC", "{M+sup}+QC", "full")


def _site_values(results: Sequence[dict], view: str, site: str, variant: str, field: str = "rv_dice",
                 key: str = "summary") -> np.ndarray:
    vals = []
    for r in results:
        entry = r["views"].get(view)
        if entry is not None:
            vals += [row[field] for row in entry.get(key) or [] if row["site"] == site and row["variant"] == variant]
    return np.array(vals, dtype=float)


def _fmt(a: np.ndarray, digits: int) -> str:
    if not len(a):
        return "-"
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}" if len(a) > 1 else f"{a.mean():.{digits}f}"


def methods_present(results: Sequence[dict], view: str) -> list[str]:
    found = {row["variant"] for r in results for row in (r["views"].get(view) or {}).get("summary", [])}
    return [m for m in METHODS + PEERS if m in found]


def method_table(results: Sequence[dict], config: Config, view: str) -> str:
    """Method x site: Dice, HD (mm) and gap closed, mean ± spread over seeds."""
    sites = [s.name for s in config.sites]
    head = "| method | " + " | ".join(f"{s} Dice | {s} HD mm | {s} gap" for s in sites) + " |"
    lines = [f"**{view}**", "", head, "|" + "---|" * (1 + 3 * len(sites))]
    for method in methods_present(results, view) + ["upper bound"]:
        cells = []
        for site in sites:
            if method == "upper bound":
                dice = _site_values(results, view, site, "M", key="upper_bound")
                hd = _site_values(results, view, site, "M", "rv_hd_mm", key="upper_bound")
            else:
                dice = _site_values(results, view, site, method)
                hd = _site_values(results, view, site, method, "rv_hd_mm")
            m = _site_values(results, view, site, "M")
            ub = _site_values(results, view, site, "M", key="upper_bound")
            gap = "-"
            if len(dice) and len(m) and len(ub) and ub.mean() - m.mean() > 1e-6:
                gap = f"{(dice.mean() - m.mean()) / (ub.mean() - m.mean()):.0%}"
            cells.append(f"{_fmt(dice, 3)} | {_fmt(hd, 1)} | {gap}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def case_dice(results: Sequence[dict], view: str, site: str, variant: str) -> dict[str, float]:
    """Each test case's RV Dice under ``variant``, averaged over the seeds whose split held it."""
    return records_case_dice([rec for r in results for rec in (r["views"].get(view) or {}).get("records", [])],
                             None, site, variant)


def records_case_dice(records, view: str | None, site: str, variant: str) -> dict[str, float]:
    """:func:`case_dice` over case records (dicts) of any number of runs (``view`` None: all are of one view)."""
    by_case: dict[str, list[float]] = {}
    for rec in records:
        if (view is None or rec["view"] == view) and (rec["site"], rec["variant"]) == (site, variant):
            by_case.setdefault(rec["case_id"], []).append(rec["rv_dice"])
    return {k: float(np.mean(v)) for k, v in by_case.items()}


def paired_test(full: dict[str, float], peer: dict[str, float]) -> dict:
    """Wilcoxon signed-rank of full - peer over the cases both have (two-sided and full > peer)."""
    common = sorted(set(full) & set(peer))
    d = np.array([full[c] - peer[c] for c in common])
    out = {"n": len(common), "median_diff": float(np.median(d)) if len(d) else float("nan"),
           "p_two_sided": float("nan"), "p_greater": float("nan")}
    if len(d) and np.any(d != 0):
        out["p_two_sided"] = float(stats.wilcoxon(d).pvalue)
        out["p_greater"] = float(stats.wilcoxon(d, alternative="greater").pvalue)
    return out


def shifted_sites(results: Sequence[dict], view: str) -> list[str]:
    """The sites where peers were adapted (those with an unlabelled pool)."""
    return sorted({site for r in results for site in ((r["views"].get(view) or {}).get("adapt") or {})
                   .get("sites", {})})


def paired_test_table(results: Sequence[dict], view: str) -> str:
    lines = [f"**{view}: full against the strongest peer, Wilcoxon signed-rank over cases**", "",
             "| site | strongest peer | full Dice | peer Dice | cases | median diff | p (two-sided) | "
             "p (full > peer) |", "|" + "---|" * 8]
    for site in shifted_sites(results, view):
        peers = [p for p in PEERS if len(_site_values(results, view, site, p))]
        if not peers:
            continue
        best = max(peers, key=lambda p: _site_values(results, view, site, p).mean())
        full, peer = case_dice(results, view, site, "full"), case_dice(results, view, site, best)
        t = paired_test(full, peer)
        lines.append(f"| {site} | {best} | {np.mean(list(full.values())):.3f} | {np.mean(list(peer.values())):.3f} | "
                     f"{t['n']} | {t['median_diff']:+.3f} | {t['p_two_sided']:.3g} | {t['p_greater']:.3g} |")
    return "\n".join(lines)


def compute_table(results: Sequence[dict], view: str) -> str:
    """Seconds each method costs per site (mean over seeds) beside its RV Dice gain over M."""
    lines = [f"**{view}: compute per site (s, mean over seeds) and RV Dice gain over M**", "",
             "| site | method | seconds | Dice gain | note |", "|" + "---|" * 5]
    for site in shifted_sites(results, view):
        m = _site_values(results, view, site, "M")
        refine_s = [(r["views"][view].get("adapt") or {}).get("full_refine_seconds") for r in results
                    if view in r["views"]]
        refine_s = [s for s in refine_s if s is not None]
        n_sites = len(shifted_sites(results, view))
        full = _site_values(results, view, site, "full")
        if len(full) and refine_s:
            lines.append(f"| {site} | full | {np.mean(refine_s):.1f} | {full.mean() - m.mean():+.3f} | "
                         f"refinement of all {n_sites} shifted sites together (K_semi rounds, incl. QC scoring) |")
        for peer in PEERS:
            info = [((r["views"][view].get("adapt") or {}).get("sites", {}).get(site) or {}).get(peer)
                    for r in results if view in r["views"]]
            info = [i for i in info if i]
            dice = _site_values(results, view, site, peer)
            if not info or not len(dice):
                continue
            notes = sorted({i["note"] for i in info if i["note"] and not i["note"].startswith("pool agreement")})
            applied = "" if all(i["applied"] for i in info) else "not applied: "
            lines.append(f"| {site} | {peer} | {np.mean([i['seconds'] for i in info]):.1f} | "
                         f"{dice.mean() - m.mean():+.3f} | {applied}{'; '.join(notes)} |")
    return "\n".join(lines)


def peers_report(results: Sequence[dict], config: Config) -> str:
    """The markdown section: per view the method x site table, the paired tests, the compute."""
    parts = []
    for view in config.views:
        if not any(view in r["views"] for r in results):
            continue
        parts += [method_table(results, config, view), paired_test_table(results, view), compute_table(results, view)]
    return "\n\n".join(parts)


def peers_png(results: Sequence[dict], config: Config, path: Path) -> Path:
    """Dice per method per site (bars: mean over seeds; whiskers: min-max of the seeds), one panel per view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedqc.predict.overlay import save_png

    views = [v for v in config.views if any(v in r["views"] for r in results)]
    sites = [s.name for s in config.sites]
    fig, axes = plt.subplots(len(views), 1, figsize=(max(6.0, 1.9 * len(sites)), 3.2 * len(views)), squeeze=False)
    for ax, view in zip(axes[:, 0], views):
        methods = methods_present(results, view) + ["upper bound"]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            means, lo, hi = [], [], []
            for site in sites:
                v = _site_values(results, view, site, "M", key="upper_bound") if method == "upper bound" else \
                    _site_values(results, view, site, method)
                means.append(v.mean() if len(v) else np.nan)
                lo.append(v.mean() - v.min() if len(v) else 0.0)
                hi.append(v.max() - v.mean() if len(v) else 0.0)
            x = np.arange(len(sites)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, means, width, yerr=[lo, hi], capsize=2, label=method)
        ax.set_xticks(np.arange(len(sites)), sites)
        ax.set_ylabel("RV Dice")
        ax.set_ylim(0, 1)
        ax.set_title(f"{view}: RV Dice per method and site (whiskers: seeds' min-max)")
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return save_png(fig, path)
