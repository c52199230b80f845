"""Which QC-based selection hurts least: {M}+QC under each rule, against M, on every site's test cases.

For a finished ``fedqc simulate`` run, every held-out test case of every site is segmented by each
of the m_best supervised candidates; each candidate's pDC / pHD (the site's fences) and its RV Dice
against the truth on the network grid are kept, and the selection rules are replayed on the same
scores:

* ``paper``: the paper's steps 1-5 (``qc.selection: paper``);
* ``guarded``: M kept while it passes both fences unless another candidate's pDC beats it by more
  than ``qc.selection_margin`` (``qc.selection: guarded``);
* ``guarded+abstain``: as guarded, and when no candidate passes both fences (a flagged case)
  M is kept instead of the paper's step 5 (a fallback among candidates QC has just judged
  out of distribution);
* ``margin``: M is kept unless another candidate's pDC beats it by more than the margin, whether
  or not M passes the fences; otherwise the paper's steps (``qc.selection: margin``, the default).

``--candidates refined`` replays the rules on the run's refined candidates (full) instead of the
supervised ones ({M}+QC); "M" is then the first refined candidate.

Prints, per view and site, the mean RV Dice (grid) of M and of each rule, and the rule minus M.
Grid Dice, not the report's original-geometry Dice: close, not identical.

    python benchmarks/selection_rules.py --config configs/quickstart.yaml --run runs/v2_s0 --set train.seed=0
    python benchmarks/selection_rules.py --tally docs/results/qc_signal/*/selection_rules_seed*.md

``--tally`` reads tables this script printed and counts, per rule, the site-views more than 0.01
below M, the worst one, and the mean difference (all rows, and SA at the shifted centres).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fedqc.cli.main import parse_overrides
from fedqc.config import load_config
from fedqc.core.types import candidate_prefix
from fedqc.data.site import load_site_split
from fedqc.evaluation.federated_report import state_of
from fedqc.fl import run_state
from fedqc.models.factory import frozen_autoencoder, segmenters_from_states
from fedqc.qc.metrics import dice
from fedqc.qc.ood import candidate_passes
from fedqc.qc.scoring import candidate_outputs
from fedqc.qc.selection import Selection, apply_selection, select_candidate
from fedqc.qc.thresholds import Thresholds

RULES = ("paper", "guarded", "guarded+abstain", "margin")


def choose(rule: str, pdc: np.ndarray, phd: np.ndarray, th: Thresholds, margin: float) -> Selection:
    """The :class:`~fedqc.qc.selection.Selection` of one case under ``rule``."""
    if rule == "paper":
        return select_candidate(pdc, phd, th.th_up_phd)
    if rule == "guarded+abstain" and not candidate_passes(pdc[None], phd[None], th).any():
        return Selection(index=0)
    return select_candidate(pdc, phd, th.th_up_phd, th.th_low_pdc, margin, m_must_pass=rule != "margin")


def tally(paths: list[Path], shifted: tuple[str, ...] = ("centre3-ge", "centre4-siemens")) -> None:
    """Per rule, over the rows of earlier outputs: how often and how far it fell below M."""
    diffs: dict[str, list[tuple[float, str]]] = {r: [] for r in RULES}
    on_shifted: dict[str, list[float]] = {r: [] for r in RULES}
    for path in paths:
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] not in ("SA", "LA") or len(cells) != 4 + 2 * len(RULES):
                continue
            for rule, value in zip(RULES, map(float, cells[4 + len(RULES):]), strict=True):
                diffs[rule].append((value, f"{path.parent.name}/{path.name} {cells[0]} {cells[1]}"))
                if cells[0] == "SA" and cells[1] in shifted:
                    on_shifted[rule].append(value)
    print(f"{len(paths)} tables\n\n| rule | site-views | more than 0.01 below M | worst | mean - M | "
          "mean - M, SA shifted |\n|---|---|---|---|---|---|")
    for rule in RULES:
        values = diffs[rule]
        worst = min(values)
        print(f"| {rule} | {len(values)} | {sum(v < -0.01 for v, _ in values)} | {worst[0]:+.3f} ({worst[1]}) | "
              f"{np.mean([v for v, _ in values]):+.4f} | {np.mean(on_shifted[rule]):+.4f} |")


def main() -> None:
    if sys.argv[1:2] == ["--tally"]:
        tally([Path(p) for p in sys.argv[2:]])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--candidates", choices=("supervised", "refined"), default="supervised")
    args = parser.parse_args()
    config = load_config(args.config, parse_overrides(args.set))
    device = torch.device("cpu")
    run = run_state.load_finished(args.run)
    state, final, supervised = run.state, run.final, run.supervised
    print(f"run {args.run}: {args.candidates} candidates (supervised rounds {state['candidates']}), "
          f"margin {config.qc.selection_margin}\n")
    print("| view | site | cases | M | " + " | ".join(RULES) + " | " + " | ".join(f"{r} - M" for r in RULES) + " |")
    print("|---|---|---|---|" + "---|" * (2 * len(RULES)))
    for view in config.views:
        if args.candidates == "refined":
            prefixes = [f"{candidate_prefix(i)}seg/{view}/" for i in range(len(final))]
            states = [state_of(final, p) for p in prefixes if any(k.startswith(p) for k in final)]
        else:
            states = [state_of(w, f"seg/{view}/") for w in supervised]
        models = segmenters_from_states(config, states, device)
        ae = frozen_autoencoder(config, state_of(final, f"ae/{view}/"), device)
        for site in config.sites:
            path = args.run / "sites" / site.name / "thresholds" / f"{view}.json"
            test = load_site_split(site, view, config, progress=None).test if path.is_file() else []
            if not test:
                continue
            th = Thresholds.from_json(path)
            per_rule = {r: [] for r in ("M", *RULES)}
            for case in test:  # the predict path's own pass: probabilities and pDC / pHD of each candidate
                probs, _, pdc, phd = candidate_outputs(models, ae, case, config.qc, device)
                per_rule["M"].append(_rv_dice(probs[0], case.labels))
                for rule in RULES:
                    sel = choose(rule, pdc, phd, th, config.qc.selection_margin)
                    per_rule[rule].append(_rv_dice(apply_selection(sel, probs), case.labels))
            mean = {r: float(np.mean(v)) for r, v in per_rule.items()}
            print(f"| {view} | {site.name} | {len(test)} | {mean['M']:.3f} | "
                  + " | ".join(f"{mean[r]:.3f}" for r in RULES) + " | "
                  + " | ".join(f"{mean[r] - mean['M']:+.3f}" for r in RULES) + " |", flush=True)


def _rv_dice(probs: np.ndarray, labels: np.ndarray) -> float:
    """RV Dice of (Z, C, H, W) probabilities' argmax against (Z, H, W) labels."""
    return float(dice(probs.argmax(1), labels, (3,))[0])


if __name__ == "__main__":
    main()
