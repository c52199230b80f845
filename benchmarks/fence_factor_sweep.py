"""How the consortium fences' Tukey factor trades flag recall for precision: offline, from a finished run.

Reads a ``fedqc simulate`` run directory: each shifted site's fences (``sites/<site>/thresholds/
<view>.json``, which keep the pooled quartiles) and the report's per-case pDC / pHD / true RV Dice
under M (``report.json``). For each factor k it refits the fences from the same quartiles
(th_low = Q1 - k IQR on pDC, th_up = Q3 + k IQR on pHD) and counts, per view over the shifted
sites' test cases, the flags (M's pDC below th_low or pHD above th_up) against bad = RV Dice < 0.8.
M's own scores stand in for the m_best candidates' (the report's flag uses all candidates), so
recall here is an upper bound of the run's at the same factor.

    python benchmarks/fence_factor_sweep.py runs/quickstart --factors 0 0.5 1 1.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BAD = 0.8


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--factors", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    args = parser.parse_args(argv)
    report = json.loads((args.run / "report.json").read_text())
    shifted = {row["site"] for row in report["qc_signal"] if row.get("own_pool")}
    print("| view | factor | th_low pDC | th_up pHD | flagged | precision | recall | labelled sites flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for view in ("SA", "LA"):
        cases = [c for c in report["cases"] if c["view"] == view and c["variant"] == "M"]
        if not cases:
            continue
        fences = None
        for site in sorted(shifted):
            path = args.run / "sites" / site / "thresholds" / f"{view}.json"
            if path.is_file():
                fences = json.loads(path.read_text())
                break
        if fences is None:
            continue
        fences = fences.get("thresholds", fences)
        for k in args.factors:
            low = fences["q1_pdc"] - k * (fences["q3_pdc"] - fences["q1_pdc"])
            up = fences["q3_phd"] + k * (fences["q3_phd"] - fences["q1_phd"])

            def flagged(c: dict) -> bool:
                return not (c["pdc"] >= low and c["phd"] <= up)

            mine = [c for c in cases if c["site"] in shifted]
            others = [c for c in cases if c["site"] not in shifted]
            flags = [flagged(c) for c in mine]
            bad = [c["rv_dice"] < BAD for c in mine]
            tp = sum(f and b for f, b in zip(flags, bad))
            precision = f"{tp / sum(flags):.2f}" if any(flags) else "-"
            recall = f"{tp / sum(bad):.2f}" if any(bad) else "-"
            print(f"| {view} | {k} | {low:.3f} | {up:.1f} | {sum(flags)}/{len(mine)} | {precision} | {recall} | "
                  f"{sum(flagged(c) for c in others)}/{len(others)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
