"""README's main command over training seeds: the QC-signal tables of docs/RESULTS.md, mean ± sd.

Each argument is a run folder of ``fedqc simulate`` (or its ``report.json``), one per seed, e.g.

    for s in 0 1 2; do fedqc simulate --config configs/quickstart.yaml --out runs/v2_s$s --set train.seed=$s; done
    python benchmarks/summarise_seeds.py runs/v2_s0 runs/v2_s1 runs/v2_s2

Prints, per view and site, RV Dice of M, {M}+QC, {M+sup}+QC (the compute-matched control) and full,
then the differences the issue's targets are about (full - {M+sup}+QC, {M}+QC - M), each as mean ± sd
over the runs with the per-run values; then the flags on the test cases (precision / recall per run)
and, on flagged cases, the prediction's RV Dice beside that of R's output; then the QC calibration
under M (Spearman of pDC with true RV Dice, AUROC of pDC for RV Dice < 0.8) per site and pooled
over the shifted (unlabelled) sites of a view.

``--upper-bound`` names, in the same seed order, runs of the same command with every site labelled
(the upper bound: the shifted sites' labels used), e.g. a copy of configs/quickstart.yaml with
``labelled: true`` everywhere; it adds the gap closed, (full - M) / (UB - M), with UB the
upper-bound run's M (the same supervised rounds as M) and its M+sup (as many supervised steps as
full had: the compute-matched ceiling). ``--centralised`` names ``fedqc ablation`` seed files of
the same config and seeds (the same split): federated against centralised, and the gap each closes
to the centralised upper bound. Where the reports hold the label-free peers (``adapt.peers``), a
table of them beside full at the shifted sites, with ``full+<peer>`` (the peer on full's refined
model) and a Wilcoxon test of full and of the best combination against the strongest peer alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from fedqc.evaluation.peers_report import paired_test, records_case_dice
from fedqc.evaluation.variants import PEERS, PEERS_ON_FULL, CaseRecord, calibration

VARIANTS = ("M", "{M}+QC", "{M+sup}+QC", "full")


def load(arg: str) -> dict:
    path = Path(arg)
    return json.loads((path / "report.json" if path.is_dir() else path).read_text())


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def runs_of(values: list[float | None], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return " / ".join("-" if v is None or math.isnan(v) else fmt.format(v) for v in values)


def main(args: list[str], upper: list[str] | None = None) -> None:
    reports = [load(a) for a in args]
    dice = [{(r["view"], r["site"], r["variant"]): r["rv_dice"] for r in rep["summary"]} for rep in reports]
    keys = sorted({(v, s) for d in dice for v, s, _ in d}, key=lambda k: (k[0] != "SA", k[1]))
    print(f"RV Dice on held-out test subjects, mean ± sd over {len(reports)} runs ({', '.join(args)})\n")
    print("| view | site | " + " | ".join(VARIANTS) + " | full - {M+sup}+QC | per run | {M}+QC - M | per run |")
    print("|---|---|" + "---|" * (len(VARIANTS) + 4))
    for view, site in keys:
        cells = [mean_sd([d.get((view, site, v)) for d in dice]) for v in VARIANTS]
        gain = [d[(view, site, "full")] - d[(view, site, "{M+sup}+QC")] for d in dice]
        sel = [d[(view, site, "{M}+QC")] - d[(view, site, "M")] for d in dice]
        print(f"| {view} | {site} | " + " | ".join(cells)
              + f" | {mean_sd(gain)} | {runs_of(gain, True)} | {mean_sd(sel)} | {runs_of(sel, True)} |")
    print("\nFlags of the test cases (bad: RV Dice of M < 0.8), per run\n")
    print("| view | site | flagged / cases | precision | recall | flagged: prediction RV Dice |"
          " flagged: R output RV Dice |")
    print("|---|---|---|---|---|---|---|")
    signal = [{(q["view"], q["site"]): q for q in rep["qc_signal"]} for rep in reports]
    for view, site in keys:
        rows = [s.get((view, site)) for s in signal]
        if any(r is None for r in rows):
            continue
        flags = [r["flags"] for r in rows]
        print(f"| {view} | {site} | " + " / ".join(f"{f['n_flagged']}/{f['n']}" for f in flags)
              + f" | {runs_of([f['precision'] for f in flags])} | {runs_of([f['recall'] for f in flags])}"
              + f" | {runs_of([r['flagged_pred_rv_dice'] for r in rows])}"
              + f" | {runs_of([r['flagged_recon_rv_dice'] for r in rows])} |")
    print("\nQC calibration under M on the test cases (Spearman of pDC with RV Dice; AUROC of pDC for "
          "RV Dice < 0.8; the same of pTC where the runs scored it, qc.consistency), per run\n")
    print("| view | sites | cases per run | Spearman | AUROC | Spearman pTC | AUROC pTC |")
    print("|---|---|---|---|---|---|---|")
    for view in sorted({k[0] for k in keys}, key=lambda v: v != "SA"):
        sites = [s for v, s in keys if v == view]
        shifted = [s for s in sites if s in _unlabelled(reports[0])]
        groups = [(s,) for s in sites] + ([tuple(shifted)] if len(shifted) > 1 else [])
        for group in groups:
            cal = [calibration([CaseRecord(**c) for c in rep["cases"] if c["view"] == view and c["site"] in group])
                   for rep in reports]
            name = group[0] if len(group) == 1 else "shifted, pooled: " + ", ".join(group)
            print(f"| {view} | {name} | {' / '.join(str(c['n']) for c in cal)} | "
                  f"{runs_of([c.get('spearman_pdc_dice') for c in cal])} | {runs_of([c.get('auroc_pdc') for c in cal])} | "
                  f"{runs_of([c.get('spearman_ptc_dice') for c in cal])} | {runs_of([c.get('auroc_ptc') for c in cal])} |")
    _peers_table(reports, dice, keys)
    if upper:
        shifted = _unlabelled(reports[0])
        _gap_closed(dice, [load(a) for a in upper], [(v, s) for v, s in keys if s in shifted])


def _peers_table(reports: list[dict], dice: list[dict], keys) -> None:
    """The label-free peers a site ran alone (``adapt.peers``), beside full, where the reports hold them."""
    peers = [p for p in PEERS + PEERS_ON_FULL if any(v == p for d in dice for _, _, v in d)]
    if not peers:
        return
    print("\nThe label-free peers at each shifted site (adapted on its own pool from M, or from full's refined "
          "model: full+<peer>), RV Dice, mean ± sd; full - peer per run\n")
    print("| view | site | full | " + " | ".join(peers) + " | " + " | ".join(f"full - {p}" for p in peers) + " |")
    print("|---|---|---|" + "---|" * (2 * len(peers)))
    applied = {(a["view"], a["site"], p): a[p]["applied"] for rep in reports for a in rep.get("adapt", []) for p in peers
               if p in a}
    for view, site in keys:
        if not any((view, site, p) in d for d in dice for p in peers):
            continue
        cells = [mean_sd([d.get((view, site, p)) for d in dice])
                 + ("" if applied.get((view, site, p), True) else " (not applied)") for p in peers]
        gaps = [runs_of([d[(view, site, "full")] - d[(view, site, p)] for d in dice if (view, site, p) in d], True)
                for p in peers]
        print(f"| {view} | {site} | {mean_sd([d[(view, site, 'full')] for d in dice])} | " + " | ".join(cells)
              + " | " + " | ".join(gaps) + " |")
    print("\nfull, and the best combination full+<peer> where present, against the strongest applied peer alone; "
          "Wilcoxon signed-rank over cases (each case's RV Dice averaged over the runs whose split held it)\n")
    print("| view | site | strongest peer | fedqc | cases | median fedqc - peer | p (two-sided) |")
    print("|---|---|---|---|---|---|---|")

    def strongest(view: str, site: str, names) -> str | None:
        present = [p for p in names if all((view, site, p) in d for d in dice) and applied.get((view, site, p), True)]
        return max(present, key=lambda p: statistics.mean(d[(view, site, p)] for d in dice)) if present else None

    for view, site in keys:
        peer = strongest(view, site, [p for p in peers if p in PEERS])
        if peer is None:
            continue
        for ours in ("full", strongest(view, site, [p for p in peers if p in PEERS_ON_FULL])):
            if ours is None:
                continue
            cases = [c for rep in reports for c in rep["cases"]]
            t = paired_test(records_case_dice(cases, view, site, ours), records_case_dice(cases, view, site, peer))
            print(f"| {view} | {site} | {peer} | {ours} | {t['n']} | {t['median_diff']:+.3f} | {t['p_two_sided']:.2g} |")


def _centralised(runs: list[str], seeds: list[str]) -> None:
    """Federated against centralised (``fedqc ablation`` on the same config and seed: the same split)."""
    if len(runs) != len(seeds):
        raise SystemExit(f"--centralised: {len(seeds)} files for {len(runs)} runs")
    fed = [{(r["view"], r["site"], r["variant"]): r["rv_dice"] for r in load(a)["summary"]} for a in runs]
    cen = [{(r["view"], r["site"], r["variant"]): r["rv_dice"] for r in json.loads(Path(f).read_text())["summary"]}
           for f in seeds]
    ub = [{(r["view"], r["site"]): r["rv_dice"] for r in json.loads(Path(f).read_text()).get("upper_bound", [])}
          for f in seeds]
    print("\nFederated against centralised on the same split, RV Dice, mean ± sd; federated - centralised per run\n")
    print("| view | site | variant | federated | centralised | federated - centralised | per run |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(v, s) for c in cen for v, s, _ in c}, key=lambda k: (k[0] != "SA", k[1]))
    for view, site in keys:
        for variant in ("M", "{M+sup}+QC", "full"):
            if not all((view, site, variant) in d for d in fed + cen):
                continue
            diff = [f[(view, site, variant)] - c[(view, site, variant)] for f, c in zip(fed, cen)]
            print(f"| {view} | {site} | {variant} | {mean_sd([f[(view, site, variant)] for f in fed])} | "
                  f"{mean_sd([c[(view, site, variant)] for c in cen])} | {mean_sd(diff)} | {runs_of(diff, True)} |")
        if all((view, site) in u for u in ub):
            top = statistics.mean(u[(view, site)] for u in ub)
            closed = [100 * (statistics.mean(d[(view, site, "full")] for d in runs_)
                             - statistics.mean(d[(view, site, "M")] for d in runs_))
                      / (top - statistics.mean(d[(view, site, "M")] for d in runs_)) for runs_ in (fed, cen)]
            print(f"| {view} | {site} | upper bound (centralised); gap closed by full, of the means | "
                  f"{closed[0]:.0f} % | {mean_sd([u[(view, site)] for u in ub])}, {closed[1]:.0f} % | - | - |")


def _unlabelled(report: dict) -> set[str]:
    """The unlabelled (shifted) sites: only they record the fences their own pool would give."""
    return {s["site"] for s in report["qc_signal"] if s.get("own_pool") is not None}


def _gap_closed(dice: list[dict], upper_reports: list[dict], keys) -> None:
    if len(upper_reports) != len(dice):
        raise SystemExit(f"--upper-bound: {len(upper_reports)} runs for {len(dice)} seeds")
    ub = [{(r["view"], r["site"], r["variant"]): r["rv_dice"] for r in rep["summary"]} for rep in upper_reports]
    print("\nGap closed at the shifted sites, (full - M) / (UB - M), per run; UB: the run with every site "
          "labelled\n")
    print("| view | site | M | full | UB (its M) | gap closed | per run | UB (its M+sup) | gap closed | per run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for view, site in keys:
        if any((view, site, "M+sup") not in u for u in ub):
            continue
        row = [f"| {view} | {site} | {mean_sd([d[(view, site, 'M')] for d in dice])} | "
               f"{mean_sd([d[(view, site, 'full')] for d in dice])}"]
        for ub_variant in ("M", "M+sup"):
            gaps = [(d[(view, site, "full")] - d[(view, site, "M")]) / (u[(view, site, ub_variant)] - d[(view, site, "M")])
                    if u[(view, site, ub_variant)] > d[(view, site, "M")] else float("nan") for d, u in zip(dice, ub)]
            mean_gap = [statistics.mean([d[(view, site, "full")] - d[(view, site, "M")] for d in dice])
                        / statistics.mean([u[(view, site, ub_variant)] - d[(view, site, "M")] for d, u in zip(dice, ub)])]
            row.append(f" | {mean_sd([u[(view, site, ub_variant)] for u in ub])} | {100 * mean_gap[0]:.0f} % | "
                       + " / ".join("-" if math.isnan(g) else f"{100 * g:.0f} %" for g in gaps))
        print("".join(row) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders of fedqc simulate (or their report.json), one per seed")
    parser.add_argument("--upper-bound", nargs="+", default=None, metavar="RUN",
                        help="runs with every site labelled, in the same seed order")
    parser.add_argument("--centralised", nargs="+", default=None, metavar="JSON",
                        help="fedqc ablation seed files (seed<N>_<view>.json) of the same split, same seed order")
    ns = parser.parse_args()
    main(ns.runs, ns.upper_bound)
    if ns.centralised:
        _centralised(ns.runs, ns.centralised)
