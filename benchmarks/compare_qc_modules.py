"""Which QC module judges and repairs best at a shifted site: the comparison in docs/RESULTS.md.

One segmenter per seed and view (fedqc's own Eq. 1 training on the labelled centres, m_best
candidates), then three QC modules R trained on the same labelled masks for the same epochs:

* ``plain``: the paper's R, reproducing ground-truth masks (``qc.autoencoder: plain``);
* ``corrective``: repairing synthetically corrupted masks (``corrective``, ``segmenter_examples: false``);
* ``corrective+seg``: also repairing the candidates' own predictions of the labelled slices under an
  appearance shift (``corrective`` with ``segmenter_examples: true``, fedqc's default).

Each is scored on every test case of the unlabelled (shifted) centres under M, in original geometry
(:func:`fedqc.evaluation.variants.score_case_variants`): Spearman(pDC, true RV Dice), AUROC(pDC, Dice
< 0.8), flag precision / recall under the consortium fences (labelled validation cases), and on
the flagged cases the RV Dice of R's output against the truth beside the prediction's own (the
pseudo-label Eq. 2 pulls toward). Everything but R is shared, so differences are R's.

    python benchmarks/compare_qc_modules.py --config configs/quickstart.yaml --seeds 0 1 2 \\
        --out docs/results/qc_modules
    python benchmarks/compare_qc_modules.py --report-from docs/results/qc_modules   # tables only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedqc.config import load_config
from fedqc.core.device import select_device
from fedqc.core.io import atomic_write, write_json
from fedqc.data.site import ensure_data, load_site_split, stack_slices
from fedqc.evaluation.variants import BAD_DICE, auroc, score_case_variants
from fedqc.models.factory import frozen_autoencoder, segmenters_from_states
from fedqc.qc.scoring import score_cases
from fedqc.qc.thresholds import fences_from_scores
from fedqc.train.stages import consortium_passes, train_autoencoder, train_supervised

MODULES = {"plain": ("plain", False), "corrective": ("corrective", False), "corrective+seg": ("corrective", True)}


def run_seed(config, seed: int, views, modules, device) -> dict:
    from scipy import stats

    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    prepared = {view: [load_site_split(site, view, config) for site in config.sites] for view in views}
    passes = consortium_passes(prepared)
    out: dict = {"seed": seed, "views": {}}
    for view, splits in prepared.items():
        train = [c for s in splits for c in s.train]
        val = [c for s in splits for c in s.val]
        t0 = time.perf_counter()
        sup = train_supervised(config, train, val, device, with_autoencoder=False, passes=passes[view], progress=None)
        models = segmenters_from_states(config, sup.candidate_states, device)
        entry = {"segmenter_s": time.perf_counter() - t0, "modules": {}}
        for name in modules:
            kind, examples = MODULES[name]
            qc = dataclasses.replace(config.qc, autoencoder=kind, segmenter_examples=examples)
            cfg = dataclasses.replace(config, qc=qc)
            t1 = time.perf_counter()
            images, labels = stack_slices(train)
            stage = train_autoencoder(cfg, sup.candidate_states, images, labels, val, device, progress=None,
                                      passes=passes[view])
            ae = frozen_autoencoder(cfg, stage.state, device)
            ae_s = time.perf_counter() - t1
            val_scores = score_cases(models, ae, val, cfg.qc, device)
            th = fences_from_scores(val_scores, cfg.qc.tukey_factor, "consortium")
            records = []
            for split in splits:
                if config.site(split.site).labelled:
                    continue
                for case in split.test:
                    records += score_case_variants(cfg, split.site, case, {"M": (models[:1], False)}, ae, th, device)
            dice = np.array([r.rv_dice for r in records])
            pdc = np.array([r.pdc for r in records])
            flag = np.array([r.ood for r in records])
            bad = dice < BAD_DICE
            tp = int((flag & bad).sum())
            per_site = {}
            for site in sorted({r.site for r in records}):
                sel = [r for r in records if r.site == site]
                f = np.array([r.ood for r in sel])
                b = np.array([r.rv_dice for r in sel]) < BAD_DICE
                per_site[site] = {
                    "n": len(sel), "bad": int(b.sum()), "flagged": int(f.sum()),
                    "precision": float((f & b).sum() / f.sum()) if f.any() else None,
                    "recall": float((f & b).sum() / b.sum()) if b.any() else None,
                    "spearman": float(stats.spearmanr([r.pdc for r in sel], [r.rv_dice for r in sel]).statistic),
                    "auroc": auroc(-np.array([r.pdc for r in sel]), b) if 0 < b.sum() < len(b) else None,
                    "flagged_pred_dice": _mean([r.pred_rv_dice_grid for r in sel if r.ood]),
                    "flagged_recon_dice": _mean([r.recon_rv_dice_grid for r in sel if r.ood]),
                    "bad_pred_dice": _mean([r.pred_rv_dice_grid for r, x in zip(sel, b) if x]),
                    "bad_recon_dice": _mean([r.recon_rv_dice_grid for r, x in zip(sel, b) if x])}
            entry["modules"][name] = {
                "ae_s": ae_s, "th_low_pdc": th.th_low_pdc, "th_up_phd": th.th_up_phd,
                "n": len(records), "bad": int(bad.sum()), "flagged": int(flag.sum()),
                "spearman": float(stats.spearmanr(pdc, dice).statistic),
                "auroc": auroc(-pdc, bad) if 0 < bad.sum() < len(bad) else None,
                "precision": tp / int(flag.sum()) if flag.any() else None,
                "recall": tp / int(bad.sum()) if bad.any() else None,
                "flagged_pred_dice": _mean([r.pred_rv_dice_grid for r in records if r.ood]),
                "flagged_recon_dice": _mean([r.recon_rv_dice_grid for r in records if r.ood]),
                "bad_pred_dice": _mean([r.pred_rv_dice_grid for r, b in zip(records, bad) if b]),
                "bad_recon_dice": _mean([r.recon_rv_dice_grid for r, b in zip(records, bad) if b]),
                "sites": per_site,
                # per case, to re-fence offline (Tukey factor sweep): pDC / pHD / true RV Dice under M
                "cases": [{"site": r.site, "case": r.case_id, "pdc": r.pdc, "phd": r.phd, "dice": r.rv_dice,
                           "pred_grid": r.pred_rv_dice_grid, "recon_grid": r.recon_rv_dice_grid} for r in records],
                "val_scores": {"pdc": val_scores.pdc.max(1).tolist(), "phd": val_scores.phd.min(1).tolist()}}
            print(f"seed {seed} {view} {name}: " + json.dumps(
                {k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry["modules"][name].items()
                 if k != "sites"}), flush=True)
        out["views"][view] = entry
    return out


def _mean(values) -> float | None:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else None


def table(results: list[dict]) -> str:
    def fmt(values, digits=3):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{np.mean(values):.{digits}f}" + (f" ± {np.std(values):.{digits}f}" if len(values) > 1 else "")

    lines = [("| view | QC module | Spearman pDC-Dice | AUROC (Dice<0.8) | flag precision | flag recall | "
              "flagged: prediction RV Dice | flagged: R output RV Dice | bad: prediction | bad: R output | R s |"),
             "|" + "---|" * 11]
    views = sorted({v for r in results for v in r["views"]}, reverse=True)
    for view in views:
        for name in MODULES:
            rows = [r["views"][view]["modules"][name] for r in results
                    if view in r["views"] and name in r["views"][view]["modules"]]
            if not rows:
                continue
            lines.append(f"| {view} | {name} | " + " | ".join(fmt([row[k] for row in rows]) for k in (
                "spearman", "auroc", "precision", "recall", "flagged_pred_dice", "flagged_recon_dice",
                "bad_pred_dice", "bad_recon_dice")) + f" | {fmt([row['ae_s'] for row in rows], 0)} |")
    seeds = ", ".join(str(r["seed"]) for r in results)
    return f"Seeds {seeds}; shifted centres' test cases pooled, under M (mean ± sd over seeds).\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--views", nargs="+", default=None)
    parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=list(MODULES))
    parser.add_argument("--out", type=Path, default=Path("runs/qc_modules"))
    parser.add_argument("--report-from", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.report_from is not None:
        results = [json.loads(p.read_text()) for p in sorted(args.report_from.glob("seed*.json"))]
        print(table(results))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    ensure_data(config)
    device = select_device(config.train.device)
    results = []
    for seed in args.seeds:
        result = run_seed(config, seed, args.views or config.views, args.modules, device)
        write_json(args.out / f"seed{seed}.json", result)
        results.append(result)
    text = table(results)
    atomic_write(args.out / "table.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
