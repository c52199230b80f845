"""Which QC module judges and repairs best at a shifted site: the comparison in docs/RESULTS.md.

One segmenter per seed and view (fedqc's own Eq. 1 training on the labelled centres, m_best
candidates), then three QC modules R trained on the same labelled masks for the same epochs:

* ``plain``: the paper's R, reproducing ground-truth masks (``qc.autoencoder: plain``);
* ``corrective``: repairing synthetically corrupted masks (``corrective``, ``segmenter_examples: false``);
* ``corrective+seg``: also repairing the candidates' own predictions of the labelled slices under an
  appearance shift (``corrective`` with ``segmenter_examples: true``, fedqc's default).

``--variant NAME:key=value,...`` adds a module with other ``qc.*`` settings on top of a named one
(e.g. ``long:base=corrective,ae_epochs=60`` or ``wide:base=corrective,ae_latent_channels=256``);
``corrupt.<field>=value`` changes the corrective module's failures (:class:`fedqc.train.corrupt.CorruptionConfig`,
e.g. ``still:base=corrective,corrupt.affine=0,corrupt.elastic=0``).
Beside the shifted-site scores each module reports its fidelity on clean masks: the RV Dice of R's
reconstruction of each labelled validation case's ground truth (a correct mask R cannot reproduce
caps the pDC of a good prediction), and the median pDC of M on the labelled validation cases.

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
import contextlib
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
from fedqc.qc.fences import fences_from_scores
from fedqc.train.stages import consortium_passes, train_autoencoder, train_supervised

MODULES = {"plain": ("plain", False), "corrective": ("corrective", False), "corrective+seg": ("corrective", True)}
VARIANTS: dict[str, dict] = {}  # name -> qc overrides (``--variant``), on top of MODULES[base]


def parse_variant(text: str) -> tuple[str, str, dict]:
    """``NAME:base=corrective,ae_epochs=60`` -> (name, base, {"ae_epochs": 60}); values typed as QCConfig's."""
    from fedqc.config import QCConfig

    name, _, rest = text.partition(":")
    pairs = dict(item.split("=", 1) for item in rest.split(",") if item)
    base = pairs.pop("base", "corrective")
    if not name or base not in MODULES:
        raise SystemExit(f"--variant {text!r}: want NAME:base=<{'|'.join(MODULES)}>,key=value,...")
    from fedqc.train.corrupt import CorruptionConfig

    fields = {f.name: f for f in dataclasses.fields(QCConfig)}
    typed: dict = {}
    for key, value in pairs.items():
        if key.startswith("corrupt."):
            field = key.removeprefix("corrupt.")
            if field not in {f.name for f in dataclasses.fields(CorruptionConfig)}:
                raise SystemExit(f"--variant {text!r}: {field} is not a CorruptionConfig field")
            typed.setdefault("corrupt", {})[field] = type(getattr(CorruptionConfig(), field))(value)
            continue
        if key not in fields:
            raise SystemExit(f"--variant {text!r}: qc.{key} is not a QC setting ({', '.join(fields)})")
        default = getattr(QCConfig(), key)
        typed[key] = (value.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(value)
    return name, base, typed


@contextlib.contextmanager
def _corruption(changes: dict | None):
    """Train the corrective module with ``changes`` to its CorruptionConfig (benchmark only)."""
    from fedqc.train import stages
    from fedqc.train.corrupt import CorruptionConfig

    if not changes:
        yield
        return
    original = stages.corruption_of
    stages.corruption_of = lambda config: (CorruptionConfig(**changes) if config.qc.autoencoder == "corrective"
                                           else None)
    try:
        yield
    finally:
        stages.corruption_of = original


@torch.no_grad()
def clean_mask_fidelity(ae, cases, device) -> list[float]:
    """Per labelled case: RV Dice (3D, over the case's slices) of R's reconstruction of its ground truth."""
    from fedqc.core.types import NUM_CLASSES
    from fedqc.qc.metrics import dice
    from fedqc.train.losses import one_hot

    out = []
    for case in cases:
        if case.labels is None:
            continue
        y = torch.as_tensor(case.labels.astype(np.int64), device=device)
        r = ae(one_hot(y, NUM_CLASSES).float()).argmax(1).cpu().numpy()
        out.append(float(dice(r, case.labels, (3,))[0]))
    return out


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
            base, overrides = VARIANTS.get(name, (name, {}))
            overrides = dict(overrides)
            corrupt = overrides.pop("corrupt", None)
            kind, examples = MODULES[base]
            qc = dataclasses.replace(config.qc, autoencoder=kind, segmenter_examples=examples, **overrides)
            cfg = dataclasses.replace(config, qc=qc)
            t1 = time.perf_counter()
            images, labels = stack_slices(train)
            with _corruption(corrupt):
                stage = train_autoencoder(cfg, sup.candidate_states, images, labels, val, device, progress=None,
                                          passes=passes[view])
            ae = frozen_autoencoder(cfg, stage.state, device)
            ae_s = time.perf_counter() - t1
            val_scores = score_cases(models, ae, val, cfg.qc, device)
            fidelity = clean_mask_fidelity(ae, val, device)
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
                "clean_recon_dice": float(np.mean(fidelity)) if fidelity else None,
                "val_pdc_median": float(np.median(val_scores.pdc[:, 0])) if len(val_scores.pdc) else None,
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
              "flagged: prediction RV Dice | flagged: R output RV Dice | bad: prediction | bad: R output | "
              "R(truth) RV Dice, labelled val | M's pDC, labelled val (median) | R s |"),
             "|" + "---|" * 13]
    views = sorted({v for r in results for v in r["views"]}, reverse=True)
    for view in views:
        names = list(dict.fromkeys(n for r in results for v in r["views"].values() for n in v["modules"]))
        for name in names:
            rows = [r["views"][view]["modules"][name] for r in results
                    if view in r["views"] and name in r["views"][view]["modules"]]
            if not rows:
                continue
            lines.append(f"| {view} | {name} | " + " | ".join(fmt([row[k] for row in rows]) for k in (
                "spearman", "auroc", "precision", "recall", "flagged_pred_dice", "flagged_recon_dice",
                "bad_pred_dice", "bad_recon_dice", "clean_recon_dice", "val_pdc_median"))
                + f" | {fmt([row['ae_s'] for row in rows], 0)} |")
    seeds = ", ".join(str(r["seed"]) for r in results)
    return f"Seeds {seeds}; shifted centres' test cases pooled, under M (mean ± sd over seeds).\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--views", nargs="+", default=None)
    parser.add_argument("--modules", nargs="+", default=None, help=f"of {', '.join(MODULES)} (default: all) "
                        "and the --variant names (default: all of them too)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:base=MODULE,key=value,...",
                        help="a module with other qc.* settings (repeatable)")
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
    for text in args.variant:
        name, base, overrides = parse_variant(text)
        VARIANTS[name] = (base, overrides)
    modules = args.modules or [*MODULES, *VARIANTS]
    unknown = [m for m in modules if m not in MODULES and m not in VARIANTS]
    if unknown:
        parser.error(f"--modules: unknown {unknown}; known: {[*MODULES, *VARIANTS]}")
    config = load_config(args.config)
    ensure_data(config)
    device = select_device(config.train.device)
    results = []
    for seed in args.seeds:
        result = run_seed(config, seed, args.views or config.views, modules, device)
        result["variants"] = {n: {"base": b, **o} for n, (b, o) in VARIANTS.items() if n in modules}
        write_json(args.out / f"seed{seed}.json", result)
        results.append(result)
    text = table(results)
    atomic_write(args.out / "table.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
