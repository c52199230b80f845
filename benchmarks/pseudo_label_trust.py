"""Where is R's output a pseudo-label worth pulling toward? Per pixel, on flagged cases (docs/RESULTS.md).

Eq. 2 changes a prediction only where R's output disagrees with it, so what decides whether
refinement teaches the truth or noise is who is right on those pixels. For each shifted (unlabelled)
site of a finished ``fedqc simulate`` run and each view, this takes the held-out test cases that the
site's fences flag under the m_best supervised candidates and, with M (the first candidate) as the
prediction P and R's output of it as the target T, counts over the flagged cases' pixels, for each
trust rule (which pixels Eq. 2 would use):

* kept: the fraction of pixels the rule keeps;
* disagree: kept pixels where argmax T differs from argmax P (the only pixels Eq. 2 moves);
* T right / P right: on those, how often each equals the truth (the rest: neither);
* RV Dice of T and of P against the truth, restricted to the kept pixels.

Rules: ``all`` (the paper), ``conf>=c`` (R's largest class probability at least c:
``refine.pseudo_label_confidence``), ``agree`` (R's outputs of all m_best candidates' predictions
have the same argmax), ``agree+conf>=0.99``.

    python benchmarks/pseudo_label_trust.py --config configs/quickstart.yaml --run runs/v2_s0 --set train.seed=0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fedqc.cli.main import parse_overrides
from fedqc.config import load_config
from fedqc.data.site import load_site_split
from fedqc.evaluation.federated_report import state_of
from fedqc.fl import run_state
from fedqc.models.factory import frozen_autoencoder, segmenters_from_states
from fedqc.qc.ood import flag_ood
from fedqc.qc.scoring import candidate_outputs, reconstruct
from fedqc.qc.thresholds import Thresholds

RV = 3
RULES = ("all", "conf>=0.9", "conf>=0.95", "conf>=0.99", "conf>=0.999", "agree", "agree+conf>=0.99")
# Per rule, summed over a site's flagged cases: kept, pixels, disagree, T right, P right,
# |T_rv & Y_rv| (kept), |T_rv| (kept), |P_rv & Y_rv| (kept), |P_rv| (kept), |Y_rv| (kept).
N_COUNTS = 10


def rule_masks(recons: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Kept pixels per rule; ``recons[i]`` is R's output (Z, C, H, W) of candidate i's prediction, M first."""
    conf = recons[0].max(1)
    labels = [r.argmax(1) for r in recons]
    agree = np.all([lab == labels[0] for lab in labels[1:]], axis=0) if len(labels) > 1 else np.ones_like(conf, bool)
    masks = {"all": np.ones_like(conf, bool), "agree": agree, "agree+conf>=0.99": agree & (conf >= 0.99)}
    masks.update({f"conf>={c:g}": conf >= c for c in (0.9, 0.95, 0.99, 0.999)})
    return masks


def counts_of(keep: np.ndarray, pred: np.ndarray, target: np.ndarray, truth: np.ndarray) -> np.ndarray:
    disagree = keep & (pred != target)
    t_rv, p_rv, y_rv = keep & (target == RV), keep & (pred == RV), keep & (truth == RV)
    return np.array([keep.sum(), keep.size, disagree.sum(), (disagree & (target == truth)).sum(),
                     (disagree & (pred == truth)).sum(), (t_rv & y_rv).sum(), t_rv.sum(), (p_rv & y_rv).sum(),
                     p_rv.sum(), y_rv.sum()], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = load_config(args.config, parse_overrides(args.set))
    device = torch.device("cpu")
    run = run_state.load_finished(args.run)
    state, final, supervised = run.state, run.final, run.supervised
    print(f"run {args.run}: m_best supervised rounds {state['candidates']}\n")
    print("| view | site | flagged cases | rule | kept | disagree | T right | P right | T RV Dice (kept) |"
          " P RV Dice (kept) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for view in config.views:
        models = segmenters_from_states(config, [state_of(w, f"seg/{view}/") for w in supervised], device)
        ae = frozen_autoencoder(config, state_of(final, f"ae/{view}/"), device)
        for site in (s for s in config.sites if not s.labelled):
            th = Thresholds.from_json(args.run / "sites" / site.name / "thresholds" / f"{view}.json")
            test = load_site_split(site, view, config, progress=None).test
            if not test:
                continue
            counts = {rule: np.zeros(N_COUNTS) for rule in RULES}
            n_flagged = 0
            for case in test:  # the predict path's own pass: each candidate's probabilities and pDC / pHD
                probs, _, pdc, phd = candidate_outputs(models, ae, case, config.qc, device)
                if not flag_ood(pdc[None], phd[None], th)[0]:
                    continue
                n_flagged += 1
                preds = probs.argmax(2)  # (m, Z, H, W)
                recons = [reconstruct(ae, torch.as_tensor(p)).float().numpy() for p in preds]  # soft, for confidence
                pred, target = preds[0], recons[0].argmax(1)
                for rule, keep in rule_masks(recons).items():
                    counts[rule] += counts_of(keep, pred, target, case.labels)
            for rule in RULES:
                kept, total, dis, t_ok, p_ok, t_int, t_rv, p_int, p_rv, y_rv = counts[rule]
                head = f"| {view} | {site.name} | {n_flagged}/{len(test)} | {rule} |"
                if not n_flagged:
                    print(head + " - | - | - | - | - | - |")
                    continue
                print(head + f" {kept / total:.3f} | {dis / total:.4f} | {_ratio(t_ok, dis)} | {_ratio(p_ok, dis)} |"
                      f" {_ratio(2 * t_int, t_rv + y_rv)} | {_ratio(2 * p_int, p_rv + y_rv)} |", flush=True)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


if __name__ == "__main__":
    main()
