"""README's main command over training seeds: the QC-signal tables of docs/RESULTS.md, mean ± sd.

Each argument is a run folder of ``fedqc simulate`` (or its ``report.json``), one per seed, e.g.

    for s in 0 1 2; do fedqc simulate --config configs/quickstart.yaml --out runs/v2_s$s --set train.seed=$s; done
    python benchmarks/summarise_seeds.py runs/v2_s0 runs/v2_s1 runs/v2_s2

Prints, per view and site, RV Dice of M, {M}+QC, {M+sup}+QC (the compute-matched control) and full,
then the differences the issue's targets are about (full - {M+sup}+QC, {M}+QC - M), each as mean ± sd
over the runs with the per-run values; then the flags on the test cases (precision / recall per run)
and, on flagged cases, the prediction's RV Dice beside that of R's output.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

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


def main(args: list[str]) -> None:
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


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
