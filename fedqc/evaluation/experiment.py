"""``fedqc ablation``: the paper's ablation on a consortium, with seeds, references and calibration.

For each training seed and view:
1. supervised training on the labelled sites (M and its m_best candidates, QC autoencoder R);
2. fences of both sources (labelled validation, each unlabelled site's own pool), and how well
   each flags the test cases with true RV Dice < 0.8;
3. inductive refinement on the unlabelled sites' adaptation pools, scored on held-out test
   subjects; transductive refinement on the test cases themselves (the paper's setting);
4. references: no adaptation (= M) and an upper bound trained with every site's labels.
Results go to ``OUT/ablation.json`` and a markdown report ``OUT/ablation.md``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedqc.config import Config
from fedqc.core.device import select_device
from fedqc.core.io import write_json
from fedqc.adapt.peers import adapt_peers
from fedqc.data.site import load_site_split
from fedqc.evaluation.variants import (
    calibration,
    flag_quality,
    score_case_variants,
    score_site_variants,
    summarise_variants,
)
from fedqc.models.factory import frozen_autoencoder, segmenters_from_states
from fedqc.qc.fences import choose_fences, fit_fences
from fedqc.qc.ood import flag_ood
from fedqc.qc.scoring import score_cases
from fedqc.train.stages import consortium_passes, refine, train_supervised


def _flag_quality(scores, th, true_dice: np.ndarray) -> dict:
    """:func:`flag_quality` of a fence set, with the fences."""
    return {"th_low_pdc": th.th_low_pdc, "th_up_phd": th.th_up_phd,
            **flag_quality(flag_ood(scores.pdc, scores.phd, th, scores.ptc), true_dice)}


def run_seed(config: Config, seed: int, out: Path, transductive: bool = True, upper_bound: bool = True) -> dict:
    """One seed of the ablation for every view; returns its records and summaries."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    device = select_device(config.train.device)
    result: dict = {"seed": seed, "views": {}}
    prepared = {view: [load_site_split(site, view, config) for site in config.sites] for view in config.views}
    passes = consortium_passes(prepared)
    for view, splits in prepared.items():
        t0 = time.perf_counter()
        train = [c for s in splits for c in s.train]
        val = [c for s in splits for c in s.val]
        sup = train_supervised(config, train, val, device, passes=passes[view])
        models = segmenters_from_states(config, sup.candidate_states, device)
        ae = frozen_autoencoder(config, sup.autoencoder_state, device)
        th_val = fit_fences(config, models, ae, val, "labelled-val", device)
        pools = {s.site: s.pool for s in splits if s.pool}
        th_own = {site: fit_fences(config, models, ae, pool, "unlabelled", device) for site, pool in pools.items()}
        chosen = {site: choose_fences(config.qc.threshold_source, labelled_val=lambda: th_val,
                                      unlabelled=lambda s=site: th_own[s], where=f"{site} {view}")
                  for site in pools}
        t_refine = time.perf_counter()
        refined, log = refine(config, models, ae, pools, chosen, train, device)
        t_refine = time.perf_counter() - t_refine
        control, _ = refine(config, models, ae, pools, chosen, train, device, progress=None, alpha_scale=0.0)
        # The label-free peers (fedqc.adapt), each adapted from M at a site on its own pool.
        peers = {site: adapt_peers(config, models[0], ae, pool, device, seed) for site, pool in pools.items()
                 if config.adapt.peers}
        records, fence_eval = [], {}
        for split in splits:
            th = chosen.get(split.site, th_val)
            records += score_site_variants(config, split.site, split.test, {
                "M": (models[:1], False), "{M}+QC": (models, True), "M+sup": (control[:1], False),
                "{M+sup}+QC": (control, True), "full": (refined, True),
                **{name: ([a.model], False) for name, a in peers.get(split.site, {}).items()}}, ae, th, device)
            if split.site in th_own and split.test:
                true_dice = np.array([r.rv_dice for r in records if r.site == split.site and r.variant == "M"])
                scores = score_cases(models, ae, split.test, config.qc, device)
                fence_eval[split.site] = {"consortium": _flag_quality(scores, th_val, true_dice),
                                          "unlabelled": _flag_quality(scores, th_own[split.site], true_dice)}
        entry = {"records": [dataclasses.asdict(r) for r in records], "summary": summarise_variants(records),
                 "calibration": calibration(records, "M"), "fence_eval": fence_eval, "refine_log": log.__dict__}
        if peers:  # compute per site: the peers' own, refinement's for all unlabelled sites together
            entry["adapt"] = {"full_refine_seconds": t_refine, "sites": {
                site: {name: {"seconds": a.seconds, "applied": a.applied, "note": a.note} for name, a in by.items()}
                for site, by in peers.items()}}
        write_json(out / f"seed{seed}_{view}.json", entry)  # kept if the references below are interrupted
        if transductive:
            tests = {s.site: s.test for s in splits if not config.site(s.site).labelled and s.test}
            tchosen = {site: choose_fences(config.qc.threshold_source, labelled_val=lambda: th_val,
                                           unlabelled=lambda c=cases: fit_fences(config, models, ae, c, "unlabelled",
                                                                                 device),
                                           where=f"{site} {view} (transductive)")
                       for site, cases in tests.items()}
            trefined, tlog = refine(config, models, ae, tests, tchosen, train, device)
            trec = []
            for site, cases in tests.items():
                trec += score_site_variants(config, site, cases, {"full": (trefined, True)}, ae, tchosen[site], device)
            entry["transductive"] = {"summary": summarise_variants(trec), "refine_log": tlog.__dict__}
        if upper_bound:
            all_labelled = dataclasses.replace(config, sites=tuple(dataclasses.replace(s, labelled=True)
                                                                   for s in config.sites))
            usplits = [load_site_split(site, view, all_labelled) for site in all_labelled.sites]
            ub = train_supervised(all_labelled, [c for s in usplits for c in s.train],
                                  [c for s in usplits for c in s.val], device, with_autoencoder=False,
                                  passes=passes[view])
            umodels = segmenters_from_states(config, ub.candidate_states[:1], device)
            urec = []
            for split in usplits:
                for case in split.test:
                    urec += score_case_variants(config, split.site, case, {"M": (umodels, False)}, ae, th_val, device)
            entry["upper_bound"] = summarise_variants(urec)
        entry["seconds"] = time.perf_counter() - t0
        result["views"][view] = entry
        write_json(out / f"seed{seed}_{view}.json", entry)
    return result


def aggregate(results: Sequence[dict], config: Config) -> str:
    """Markdown report: per site and view, mean over seeds (± spread) of each variant's RV Dice/HD."""
    lines = ["| view | site | labelled | M Dice | {M}+QC Dice | full Dice | transductive full | upper bound |"
             " gap closed | M HD | {M}+QC HD | full HD |", "|" + "---|" * 12]
    for view in config.views:
        for site in config.sites:
            def values(key: str, variant: str | None = None, field: str = "rv_dice") -> np.ndarray:
                vals = []
                for r in results:
                    entry = r["views"].get(view)
                    if entry is None:
                        continue
                    rows = entry.get(key, {}).get("summary", []) if key == "transductive" else entry.get(key, [])
                    vals += [row[field] for row in rows if row["site"] == site.name and
                             (variant is None or row["variant"] == variant)]
                return np.array(vals)

            m, qc, full = (values("summary", v) for v in ("M", "{M}+QC", "full"))
            if not len(m):
                continue
            tr, ub = values("transductive", "full"), values("upper_bound", "M")
            hd = [values("summary", v, "rv_hd_mm") for v in ("M", "{M}+QC", "full")]

            def fmt(a: np.ndarray, digits: int = 3) -> str:
                if not len(a):
                    return "-"
                return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}" if len(a) > 1 else f"{a.mean():.{digits}f}"

            gap = (full.mean() - m.mean()) / (ub.mean() - m.mean()) if len(ub) and ub.mean() - m.mean() > 1e-6 else np.nan
            lines.append(f"| {view} | {site.name} | {'yes' if site.labelled else 'no'} | {fmt(m)} | {fmt(qc)} | "
                         f"{fmt(full)} | {fmt(tr)} | {fmt(ub)} | {gap:.0%} | {fmt(hd[0], 2)} | {fmt(hd[1], 2)} | "
                         f"{fmt(hd[2], 2)} |")
    return "\n".join(lines)


def quality_tables(results: Sequence[dict], config: Config) -> str:
    """QC calibration per seed and view, and both fence sources' flag quality per shifted site."""
    lines = ["| seed | view | Spearman pDC-Dice | Spearman pHD-HD | AUROC (pDC, Dice<0.8) | flag precision | "
             "flag recall | cases | bad |", "|" + "---|" * 9]
    fences = ["| seed | view | site | fence source | th_low pDC | th_up pHD | flagged | precision | recall | bad |",
              "|" + "---|" * 10]
    for r in results:
        for view, entry in r["views"].items():
            c = entry["calibration"]
            lines.append(f"| {r['seed']} | {view} | {c['spearman_pdc_dice']:.3f} | {c['spearman_phd_hd']:.3f} | "
                         f"{c['auroc_pdc']:.3f} | {c['precision']:.3f} | {c['recall']:.3f} | {c['n']} | "
                         f"{c['n_bad']} |")
            for site, sources in entry["fence_eval"].items():
                for source, f in sources.items():
                    prec = "-" if f["precision"] is None else f"{f['precision']:.2f}"
                    rec = "-" if f["recall"] is None else f"{f['recall']:.2f}"
                    fences.append(f"| {r['seed']} | {view} | {site} | {source} | {f['th_low_pdc']:.3f} | "
                                  f"{f['th_up_phd']:.1f} | {f['n_flagged']}/{f['n']} | {prec} | {rec} | {f['n_bad']} |")
    pseudo = ["| seed | view | site | flagged under M | their RV Dice (grid) | RV Dice of R's reconstruction (grid) |",
              "|" + "---|" * 6]
    for r in results:
        for view, entry in r["views"].items():
            for row in entry["summary"]:
                if row["variant"] == "M" and "flagged_recon_rv_dice_grid" in row and row["flagged"]:
                    pseudo.append(f"| {r['seed']} | {view} | {row['site']} | {row['flagged']}/{row['n']} | "
                                  f"{row['flagged_pred_rv_dice_grid']:.3f} | {row['flagged_recon_rv_dice_grid']:.3f} |")
    return "\n".join(lines) + "\n\n" + "\n".join(fences) + "\n\n" + "\n".join(pseudo)


def load_results(folders: Sequence[Path]) -> list[dict]:
    """Per-seed results from the ``seed<N>_<VIEW>.json`` files of earlier runs (several folders)."""
    import json
    import re

    seeds: dict[int, dict] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("seed*_*.json")):
            match = re.fullmatch(r"seed(\d+)_(SA|LA)", path.stem)
            if match:
                entry = seeds.setdefault(int(match[1]), {"seed": int(match[1]), "views": {}})
                entry["views"][match[2]] = json.loads(path.read_text())
    return [seeds[k] for k in sorted(seeds)]
