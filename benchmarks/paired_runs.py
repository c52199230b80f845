"""One variant of one ablation run against one variant of another, paired over the same test cases.

Two runs of ``fedqc ablation`` with the same config, seeds and splits but different settings (e.g.
fedqc's defaults against the paper's ``qc.autoencoder: plain``, ``qc.threshold_source: unlabelled``,
``qc.selection: paper``) hold the same test cases; this prints, per shifted site, the mean RV Dice of
each and the Wilcoxon signed-rank test over cases (each case's Dice averaged over the seeds whose
split held it, as docs/RESULTS.md's peers tables do):

    python benchmarks/paired_runs.py --view SA docs/results/peers/v2_sa_conf0 full docs/results/peers/paper_sa full
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedqc.evaluation.experiment import load_results
from fedqc.evaluation.peers_report import case_dice, paired_test, shifted_sites


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("variant_a")
    parser.add_argument("run_b", type=Path)
    parser.add_argument("variant_b")
    parser.add_argument("--view", choices=("SA", "LA"), default="SA")
    args = parser.parse_args(argv)
    a, b = load_results([args.run_a]), load_results([args.run_b])
    if [r["seed"] for r in a] != [r["seed"] for r in b]:
        raise SystemExit(f"the runs hold different seeds: {[r['seed'] for r in a]} and {[r['seed'] for r in b]}")
    print(f"{args.view}: {args.variant_a} of {args.run_a} (A) against {args.variant_b} of {args.run_b} (B), "
          f"seeds {[r['seed'] for r in a]}\n")
    print("| site | A Dice | B Dice | cases | median A - B | p (two-sided) | p (A > B) |")
    print("|---|---|---|---|---|---|---|")
    for site in shifted_sites(a, args.view):
        da, db = case_dice(a, args.view, site, args.variant_a), case_dice(b, args.view, site, args.variant_b)
        t = paired_test(da, db)
        common = sorted(set(da) & set(db))
        print(f"| {site} | {np.mean([da[c] for c in common]):.3f} | {np.mean([db[c] for c in common]):.3f} | "
              f"{t['n']} | {t['median_diff']:+.3f} | {t['p_two_sided']:.2g} | {t['p_greater']:.2g} |")


if __name__ == "__main__":
    main()
