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

import numpy as np

from fedqc.qc.ood import flag_ood
from fedqc.qc.thresholds import Thresholds, fence_quartiles, pooled_fences

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
        stored = next((path for site in sorted(shifted)
                       if (path := args.run / "sites" / site / "thresholds" / f"{view}.json").is_file()), None)
        if stored is None:
            continue
        quartiles = fence_quartiles(Thresholds.from_json(stored))
        mine = [c for c in cases if c["site"] in shifted]
        others = [c for c in cases if c["site"] not in shifted]
        bad = np.array([c["rv_dice"] < BAD for c in mine])
        for k in args.factors:
            fences = pooled_fences([quartiles], k)  # the coordinator's own formula, at factor k

            def flags(rows: list[dict], fences: Thresholds = fences) -> np.ndarray:
                return flag_ood(np.array([c["pdc"] for c in rows]), np.array([c["phd"] for c in rows]), fences)

            flagged = flags(mine)
            tp = int((flagged & bad).sum())
            precision = f"{tp / flagged.sum():.2f}" if flagged.any() else "-"
            recall = f"{tp / bad.sum():.2f}" if bad.any() else "-"
            print(f"| {view} | {k} | {fences.th_low_pdc:.3f} | {fences.th_up_phd:.1f} | {int(flagged.sum())}/{len(mine)} "
                  f"| {precision} | {recall} | {int(flags(others).sum()) if others else 0}/{len(others)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
