"""The aggregation comparison in docs/FEDERATION.md: RV Dice per site and view from quickstart runs.

Each run directory is named ``<arm>_s<seed>`` (e.g. ``eq2_s1``) and holds the ``report.json`` that
``fedqc simulate`` writes; the arms were run as

    fedqc simulate --config configs/quickstart.yaml --out runs/aggcmp/eq2_s1 \\
        --set train.seed=1 --set federation.refine_aggregation=eq2

(``slices``: ``refine_aggregation=slices``; ``median``: ``aggregation=median``; ``bf16``:
``half_precision_transfer=true``). Prints M and full RV Dice (mean ± sd over seeds) and each run's
own gain from refinement (full - M, paired within the run), then the mean over seeds.

    python benchmarks/compare_aggregation.py runs/aggcmp          # or docs/results/aggregation
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path


def load(folder: Path) -> tuple[dict, dict]:
    rows, arms = collections.defaultdict(dict), collections.defaultdict(list)
    for path in sorted(folder.glob("*_s*/report.json")) + sorted(folder.glob("*_s*.json")):
        run = path.parent.name if path.name == "report.json" else path.stem
        arm, seed = run.rsplit("_s", 1)
        arms[arm].append(seed)
        for r in json.loads(path.read_text())["summary"]:
            rows[(r["view"], r["site"], r["variant"])][(arm, seed)] = r["rv_dice"]
    return rows, arms


def main() -> None:
    rows, arms = load(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/aggregation"))
    order = [a for a in ("slices", "eq2", "median", "bf16") if a in arms] + sorted(set(arms) - {"slices", "eq2", "median", "bf16"})
    print("| view | site | variant | " + " | ".join(f"{a} (seeds {','.join(arms[a])})" for a in order) + " |")
    print("|---|---|---|" + "---:|" * len(order))
    for key in sorted(k for k in rows if k[2] in ("M", "full")):
        cells = []
        for a in order:
            vals = [rows[key][(a, s)] for s in arms[a] if (a, s) in rows[key]]
            cells.append(f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""))
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    print("\nRefinement's gain, full - M, paired within each run (mean over seeds):\n")
    print("| view | site | " + " | ".join(order) + " |")
    print("|---|---|" + "---:|" * len(order))
    for view, site in sorted({(k[0], k[1]) for k in rows}):
        gains = [statistics.mean(rows[(view, site, "full")][(a, s)] - rows[(view, site, "M")][(a, s)] for s in arms[a])
                 for a in order]
        print(f"| {view} | {site} | " + " | ".join(f"{g:+.3f}" for g in gains) + " |")


if __name__ == "__main__":
    main()
