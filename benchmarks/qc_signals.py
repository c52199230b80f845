"""Which label-free signal tells a bad RV from a good one at a shifted site? Offline, from a finished run.

pDC (the agreement of a prediction with R's output of it) judges the mask's shape alone, and R
reproduces even a correct RV at about 0.72 RV Dice (docs/RESULTS.md), so moderately bad RVs
(true RV Dice 0.6-0.8) score like good ones. This measures, on the same cases and candidates,
signals that look at the image through the segmenter as well:

* ``pdc``: the flags' own score, each case's best candidate pDC (the paper's, the baseline);
* ``cand``: how much the m_best candidates agree (mean pairwise RV Dice of their predictions);
* ``tta``: how much M agrees with itself under the augmentations it was trained to be invariant
  to (flips on each axis and both, gamma 0.7 and 1.5 on the min-max normalised slice; mean RV Dice
  of M's prediction against each transformed prediction, transformed back);
  ``tta-flips``, ``tta-flip12``, ``tta-gamma``: the flips alone, the flip on both axes alone, the gammas alone;
* ``conf``: M's mean RV probability over the pixels it calls RV;
* ``pdc*tta``, ``min(pdc,tta)``: the paper's score combined with the image-aware one.

For each signal: Spearman against the true RV Dice (network grid) and AUROC for RV Dice < 0.8 over
the shifted sites' held-out test cases pooled, and the flags of Tukey fences fitted on the labelled
sites' validation cases (the consortium's reference, pooled here) at factors 1.5 and 0 (the lower
quartile): precision / recall at the shifted sites and how many labelled test cases they flag.

    python benchmarks/qc_signals.py --config configs/quickstart.yaml --run runs/quickstart --set train.seed=0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from fedqc.cli.main import parse_overrides
from fedqc.config import load_config
from fedqc.data.site import load_site_split
from fedqc.evaluation.federated_report import state_of
from fedqc.evaluation.variants import auroc
from fedqc.fl import run_state
from fedqc.models.factory import frozen_autoencoder, segmenters_from_states
from fedqc.qc.consistency import transformed_predictions
from fedqc.qc.metrics import dice
from fedqc.qc.scoring import candidate_outputs, segment

RV = 3
BAD = 0.8
SIGNALS = ("pdc", "cand", "tta", "tta-flips", "tta-flip12", "tta-gamma", "conf", "pdc*tta", "min(pdc,tta)")


def tta_agreements(model: torch.nn.Module, images: np.ndarray, pred: np.ndarray, device: torch.device
                   ) -> list[float]:
    """RV Dice of ``pred`` against M's predictions of transformed slices, transformed back, per
    transform of :mod:`fedqc.qc.consistency` (flips on axis 1, axis 2 and both; gamma 0.7 and 1.5):
    their mean is pTC."""
    x = torch.as_tensor(images, dtype=torch.float32, device=device)
    others = transformed_predictions(lambda t: segment(model, t, device).argmax(1), x)
    return [float(dice(pred, o.cpu().numpy(), (RV,))[0]) for o in others]


def case_signals(models, ae, case, config, device) -> dict[str, float]:
    probs, _, pdc, _ = candidate_outputs(models, ae, case, config.qc, device)
    preds = probs.argmax(2)  # (m, Z, H, W)
    pred = preds[0]
    m = len(models)
    cand = np.mean([dice(preds[i], preds[j], (RV,))[0] for i in range(m) for j in range(i + 1, m)]) if m > 1 else 1.0
    rv = pred == RV
    conf = float(probs[0][:, RV][rv].mean()) if rv.any() else 0.0
    each = tta_agreements(models[0], case.images, pred, device)
    tta = float(np.mean(each))
    best = float(np.max(pdc))
    out = {"pdc": best, "cand": float(cand), "tta": tta, "tta-flips": float(np.mean(each[:3])),
           "tta-flip12": each[2], "tta-gamma": float(np.mean(each[3:])), "conf": conf, "pdc*tta": best * tta,
           "min(pdc,tta)": min(best, tta)}
    if case.labels is not None:
        out["dice"] = float(dice(pred, case.labels, (RV,))[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--views", nargs="+", default=["SA"])
    parser.add_argument("--json", type=Path, help="write every case's signals here")
    args = parser.parse_args()
    config = load_config(args.config, parse_overrides(args.set))
    device = torch.device("cpu")
    torch.set_num_threads(2)
    run = run_state.load_finished(args.run)
    rows = []
    for view in args.views:
        models = segmenters_from_states(config, [state_of(w, f"seg/{view}/") for w in run.supervised], device)
        ae = frozen_autoencoder(config, state_of(run.final, f"ae/{view}/"), device)
        for site in config.sites:
            split = load_site_split(site, view, config, progress=None)
            parts = [("test", split.test)] + ([("val", split.val)] if site.labelled else [])
            for part, cases in parts:
                for case in cases:
                    rows.append({"view": view, "site": site.name, "labelled": site.labelled, "part": part,
                                 "case_id": case.case_id, **case_signals(models, ae, case, config, device)})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    for view in args.views:
        print(f"\n{view}: {args.run}\n")
        print("| signal | Spearman (shifted) | AUROC (shifted) | k | th | shifted flagged | precision | recall |"
              " labelled test flagged |")
        print("|---|---|---|---|---|---|---|---|---|")
        mine = [r for r in rows if r["view"] == view]
        ref = [r for r in mine if r["part"] == "val"]
        shifted = [r for r in mine if r["part"] == "test" and not r["labelled"]]
        labelled = [r for r in mine if r["part"] == "test" and r["labelled"]]
        dice_true = np.array([r["dice"] for r in shifted])
        bad = dice_true < BAD
        for name in SIGNALS:
            s = np.array([r[name] for r in shifted])
            rho = spearmanr(s, dice_true).statistic
            area = auroc(-s, bad) if 0 < bad.sum() < len(bad) else float("nan")  # a low score flags
            q1, q3 = np.percentile([r[name] for r in ref], [25, 75])
            for k in (1.5, 0.0):
                th = q1 - k * (q3 - q1)
                flagged = s < th
                tp = int((flagged & bad).sum())
                prec = f"{tp / flagged.sum():.2f}" if flagged.any() else "-"
                lab = sum(r[name] < th for r in labelled)
                print(f"| {name} | {rho:.3f} | {area:.3f} | {k} | {th:.3f} | {int(flagged.sum())}/{len(s)} | {prec} |"
                      f" {tp / bad.sum():.2f} | {lab}/{len(labelled)} |")
        print(f"\n(shifted test cases: {len(shifted)}, bad: {int(bad.sum())}; reference: {len(ref)} labelled "
              f"validation cases; labelled test cases: {len(labelled)})")


if __name__ == "__main__":
    main()
