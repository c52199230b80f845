"""One variant of one ablation run against one variant of another, paired over the same test cases.

Two runs of ``fedqc ablation`` with the same config, seeds and splits but different settings (e.g.
fedqc's defaults against the paper's ``qc.autoencoder: plain``, ``qc.threshold_source: unlabelled``,
``qc.selection: paper``) hold the same test cases; this prints, per shifted site, the mean RV Dice of
each and the Wilcoxon signed-rank test over cases (each case's Dice averaged over the seeds whose
split held it, as docs/RESULTS.md's peers tables do):

    python benchmarks/paired_runs.py --view SA docs/results/peers/v2_sa_conf0 full docs/results/peers/paper_sa full

A run may also be federated: ``fedqc simulate`` run folders (or their ``report.json``), one per seed,
comma-separated in seed order; cases are then paired by (seed, case), and ``--all-sites`` adds the
labelled sites to the shifted ones (those with an unlabelled pool):

    python benchmarks/paired_runs.py runs/still_s0,runs/still_s1,runs/still_s2 full \
        docs/results/qc_signal/v2/conf0/seed0.json,docs/results/qc_signal/v2/conf0/seed1.json,... full
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedqc.evaluation.experiment import load_results
from fedqc.evaluation.peers_report import case_dice, paired_test, records_case_dice, shifted_sites


class Federated:
    """Federated reports (``report.json`` of ``fedqc simulate``), one per seed, read as one run."""

    def __init__(self, spec: str):
        import json

        paths = [Path(p) for p in spec.split(",") if p]
        self.reports = [json.loads(((p / "report.json") if p.is_dir() else p).read_text()) for p in paths]
        self.seeds = list(range(len(self.reports)))

    def sites(self, view: str, every: bool = False) -> list[str]:
        return sorted({q["site"] for r in self.reports for q in r["qc_signal"]
                       if q["view"] == view and (every or q.get("own_pool") is not None)})

    def dice(self, view: str, site: str, variant: str) -> dict[tuple[int, str], float]:
        """RV Dice per (seed, case): each seed's run is its own training, so its cases pair only with that seed's."""
        return {(seed, case): dice for seed, r in enumerate(self.reports)
                for case, dice in records_case_dice(r["cases"], view, site, variant).items()}


def _is_federated(spec: str) -> bool:
    first = Path(spec.split(",")[0])
    return "," in spec or (first / "report.json").is_file() or (first.suffix == ".json" and first.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("variant_a")
    parser.add_argument("run_b", type=Path)
    parser.add_argument("variant_b")
    parser.add_argument("--view", choices=("SA", "LA"), default="SA")
    parser.add_argument("--all-sites", action="store_true", help="federated runs: the labelled sites too")
    args = parser.parse_args(argv)
    if _is_federated(str(args.run_a)) or _is_federated(str(args.run_b)):
        fa, fb = Federated(str(args.run_a)), Federated(str(args.run_b))
        if len(fa.reports) != len(fb.reports):
            raise SystemExit(f"{len(fa.reports)} reports against {len(fb.reports)}: "
                             "give one per seed, in the same order")
        _table(args, fa.sites(args.view, args.all_sites), lambda s: fa.dice(args.view, s, args.variant_a),
               lambda s: fb.dice(args.view, s, args.variant_b),
               f"{len(fa.reports)} federated runs each, cases paired by (seed, case)")
        return
    a, b = load_results([args.run_a]), load_results([args.run_b])
    if [r["seed"] for r in a] != [r["seed"] for r in b]:
        raise SystemExit(f"the runs hold different seeds: {[r['seed'] for r in a]} and {[r['seed'] for r in b]}")
    _table(args, shifted_sites(a, args.view), lambda s: case_dice(a, args.view, s, args.variant_a),
           lambda s: case_dice(b, args.view, s, args.variant_b), f"seeds {[r['seed'] for r in a]}")


def _table(args, sites, dice_a, dice_b, seeds: str) -> None:
    print(f"{args.view}: {args.variant_a} of {args.run_a} (A) against {args.variant_b} of {args.run_b} (B), "
          f"{seeds}\n")
    print("| site | A Dice | B Dice | cases | median A - B | p (two-sided) | p (A > B) |")
    print("|---|---|---|---|---|---|---|")
    for site in sites:
        da, db = dice_a(site), dice_b(site)
        t = paired_test(da, db)
        common = sorted(set(da) & set(db))
        print(f"| {site} | {np.mean([da[c] for c in common]):.3f} | {np.mean([db[c] for c in common]):.3f} | "
              f"{t['n']} | {t['median_diff']:+.3f} | {t['p_two_sided']:.2g} | {t['p_greater']:.2g} |")


if __name__ == "__main__":
    main()
