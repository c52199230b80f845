"""Post-DAE as a last resort (``qc.reconstruction_floor``), replayed on recorded cases.

Every case record of a federated report (``fedqc simulate``'s ``report.json``) or of an ablation
seed (``fedqc ablation``'s ``seed*_<view>.json``) keeps, for each variant, the selected prediction's
pDC and OoD flag and, on the network grid, the RV Dice of that prediction and of R's reconstruction
of it. A floor replaces a selection whose pDC is below it by that reconstruction, which is exactly
what ``qc.reconstruction_floor`` does at prediction time; so the replay needs no network, only the
records. Grid Dice, not the reports' original-geometry Dice: close, not identical.

    python benchmarks/reconstruction_floor.py docs/results/peers/v2_la_conf0/*.json \\
        docs/results/peers/v2_sa_conf0/*.json docs/results/qc_signal/v2/conf0/seed*.json

Prints, per floor and variant (the two that select, {M}+QC and full): site-views below their
unreplaced selves by more than 0.01, the worst, the mean over all site-views and over the shifted
sites (centre3, centre4), and the mean at the shifted sites per group of files (per folder);
``--only-flagged`` replaces flagged cases only; ``--per-site`` replaces every case of a site-view
whose median pDC is below the floor (a site-level switch to Post-DAE: the segmenter failed there;
not implemented in fedqc, measured here); ``--detail FLOOR`` lists each site-view it moves.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from fedqc.predict.case import below_floor

FLOORS = (0.1, 0.2, 0.3, 0.4, 0.5)
SHIFTED = ("centre3", "centre4")


def records(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data.get("cases") or data.get("records") or []


def replay(recs: list[dict], variant: str, floor: float, only_flagged: bool = False,
           per_site: bool = False) -> dict[tuple[str, str], float]:
    """Mean grid RV Dice change per (view, site) when the floor applies."""
    by = collections.defaultdict(list)
    for r in recs:
        if r["variant"] == variant and r["recon_rv_dice_grid"] == r["recon_rv_dice_grid"]:
            by[(r["view"], r["site"])].append(r)
    out = {}
    for key, cases in by.items():
        site_below = per_site and below_floor(floor, [r["pdc"] for r in cases])  # the rule fedqc applies
        out[key] = float(np.mean([r["recon_rv_dice_grid"] - r["pred_rv_dice_grid"]
                                  if (site_below if per_site else r["pdc"] < floor and (r["ood"] or not only_flagged))
                                  else 0.0 for r in cases]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--only-flagged", action="store_true")
    parser.add_argument("--per-site", action="store_true")
    parser.add_argument("--detail", type=float, default=None, metavar="FLOOR")
    args = parser.parse_args(argv)
    data = [(f, records(f)) for f in args.files]
    groups = sorted({f.parent.name for f, _ in data})
    what = ("every case of a site-view whose median pDC is" if args.per_site
            else "flagged cases" if args.only_flagged else "any case")
    print(f"{len(data)} files ({', '.join(groups)}); the floor replaces {what} below it\n")
    print("| floor | variant | site-views | below by > 0.01 | worst | mean | mean, shifted | "
          + " | ".join(f"shifted: {g}" for g in groups) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(groups))
    for floor in FLOORS:
        for variant in ("{M}+QC", "full"):
            rows = [(f.parent.name, f.name, k, d) for f, recs in data
                    for k, d in replay(recs, variant, floor, args.only_flagged, args.per_site).items()]
            deltas = np.array([d for *_, d in rows])
            shifted = [d for _, _, (_, site), d in rows if site.startswith(SHIFTED)]
            per_group = [np.mean([d for g, _, (_, site), d in rows if g == group and site.startswith(SHIFTED)])
                         for group in groups]
            print(f"| {floor} | {variant} | {len(rows)} | {int((deltas < -0.01).sum())} | {deltas.min():+.3f} | "
                  f"{deltas.mean():+.3f} | {np.mean(shifted):+.3f} | "
                  + " | ".join(f"{v:+.3f}" for v in per_group) + " |")
    if args.detail is not None:
        print(f"\nfull at floor {args.detail}: site-views it moves by more than 0.01\n")
        for f, recs in data:
            for (view, site), d in sorted(replay(recs, "full", args.detail, args.only_flagged, args.per_site).items()):
                if abs(d) > 0.01:
                    print(f"- {f.parent.name}/{f.name} {view} {site}: {d:+.3f}")


if __name__ == "__main__":
    main()
