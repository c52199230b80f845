"""The report of a finished simulated federation, per site: the paper's ablation on held-out subjects.

In simulation the coordinator may read every site's test labels because they are all on this
machine. Each site's held-out test cases are scored with M (best supervised global model),
{M}+QC (selection among the m_best supervised models) and full (selection among the refined
models), with the fences each site kept in its work dir.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fedqc.config import Config
from fedqc.core.types import CONTROL_PREFIX as CONTROL
from fedqc.core.types import candidate_prefix
from fedqc.models.factory import frozen_autoencoder, segmenters_from_states


def state_of(weights: Mapping[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
    """The torch state dict of the network stored under ``prefix`` in flat run weights (``m0/seg/SA/``)."""
    return {k[len(prefix):]: torch.as_tensor(v) for k, v in weights.items() if k.startswith(prefix)}


def federated_report(config: Config, run_dir: Path, final: Mapping[str, np.ndarray],
                     supervised: Sequence[Mapping[str, np.ndarray]], progress=print) -> str:
    """Per-site ablation table of a finished simulated run; writes ``RUN/report.md`` and ``.json``.

    Args:
        final: the run's final global weights (``m<i>/seg/<view>/...`` refined candidates, ``ae/...``).
        supervised: the m_best supervised global weights (``seg/<view>/...``), best first.
    """
    from fedqc.core.device import select_device
    from fedqc.core.io import write_json
    from fedqc.core.table import format_table
    from fedqc.data.site import load_site_split
    from fedqc.evaluation.variants import score_site_variants, summarise_variants
    from fedqc.qc.thresholds import Thresholds

    device = select_device(config.train.device)
    records, signal, adapt_cost = [], [], []
    for view in config.views:
        m = sum(1 for i in range(len(final)) if any(k.startswith(f"{candidate_prefix(i)}seg/{view}/") for k in final))
        refined = segmenters_from_states(config, [state_of(final, f"{candidate_prefix(i)}seg/{view}/")
                                                  for i in range(m)], device)
        sup = segmenters_from_states(config, [state_of(w, f"seg/{view}/") for w in supervised], device) or refined[:1]
        ae = frozen_autoencoder(config, state_of(final, f"ae/{view}/"), device)
        m_ctl = sum(1 for i in range(m) if any(k.startswith(f"{CONTROL}{candidate_prefix(i)}seg/{view}/") for k in final))
        control = segmenters_from_states(config, [state_of(final, f"{CONTROL}{candidate_prefix(i)}seg/{view}/")
                                                  for i in range(m_ctl)], device)
        for site in config.sites:
            folder = run_dir / "sites" / site.name / "thresholds"
            if not (folder / f"{view}.json").is_file():
                continue
            th = Thresholds.from_json(folder / f"{view}.json")
            split = load_site_split(site, view, config, progress=None)
            variants = {"M": (sup[:1], False), "{M}+QC": (sup, True), "full": (refined, True)}
            if control:
                variants.update({"M+sup": (control[:1], False), "{M+sup}+QC": (control, True)})
            if config.adapt.peers and split.pool:  # what the site could do alone: peers on its own pool
                from fedqc.adapt.peers import adapt_peers

                peers = adapt_peers(config, sup[0], ae, split.pool, device, config.train.seed)
                # ... and on top of the consortium's refined model: does combining them help?
                peers.update({f"full+{name}": a for name, a in
                              adapt_peers(config, refined[0], ae, split.pool, device, config.train.seed).items()})
                variants.update({name: ([a.model], False) for name, a in peers.items()})
                adapt_cost.append({"view": view, "site": site.name, **{
                    name: {"seconds": a.seconds, "applied": a.applied, "note": a.note} for name, a in peers.items()}})
            site_records = score_site_variants(config, site.name, split.test, variants, ae, th, device)
            records += site_records
            if split.test:
                signal.append(_qc_signal(config, site.name, view, split.test, site_records, sup, ae, th,
                                         folder / f"{view}.own-pool.json", device))
            if progress:
                progress(f"  report: scored {len(split.test)} {view} test cases of {site.name}")
    rows = summarise_variants(records)
    write_json(run_dir / "report.json", {"summary": rows, "qc_signal": signal, "cases": [r.__dict__ for r in records],
                                         **({"adapt": adapt_cost} if adapt_cost else {})})
    table = format_table(["view", "site", "variant", "n", "RV Dice", "RV HD mm", "RV Dice (LCC)", "RV HD mm (LCC)",
                          "flagged"],
                         [[r["view"], r["site"], r["variant"], r["n"], r["rv_dice"], round(r["rv_hd_mm"], 2),
                           r["rv_dice_lcc"], round(r["rv_hd_mm_lcc"], 2), r["flagged"]] for r in rows])
    qc_table = format_table(
        ["view", "site", "fences", "flagged / cases", "bad (Dice<0.8)", "precision", "recall",
         "own-pool fences: flagged", "own-pool precision", "own-pool recall", "flagged: prediction RV Dice",
         "flagged: R output RV Dice", "Spearman pDC-Dice", "AUROC pDC", "Spearman pTC-Dice", "AUROC pTC"],
        [[s["view"], s["site"], s["fences"], f"{s['flags']['n_flagged']}/{s['flags']['n']}", s["flags"]["n_bad"],
          _fmt(s["flags"]["precision"]), _fmt(s["flags"]["recall"]),
          "-" if s["own_pool"] is None else f"{s['own_pool']['n_flagged']}/{s['own_pool']['n']}",
          _fmt(s["own_pool"] and s["own_pool"]["precision"]), _fmt(s["own_pool"] and s["own_pool"]["recall"]),
          _fmt(s["flagged_pred_rv_dice"]), _fmt(s["flagged_recon_rv_dice"]),
          _fmt(s["calibration"].get("spearman_pdc_dice")), _fmt(s["calibration"].get("auroc_pdc")),
          _fmt(s["calibration"].get("spearman_ptc_dice")), _fmt(s["calibration"].get("auroc_ptc"))] for s in signal])
    gains = _gains(rows)
    text = ("# fedqc federated run: per-site ablation on held-out test subjects\n\n" + table +
            "\n\n## The QC signal on the held-out test cases\n\nFlags of the m_best supervised candidates under "
            "the fences each site used (bad: true RV Dice of M below 0.8), beside the fences its own pool would "
            "give; on flagged cases, the prediction's RV Dice against that of R's output of it (network grid); "
            "under M, the Spearman correlation of pDC with true RV Dice and the AUROC of pDC for bad cases "
            "('-' where the site's test cases are all good or all bad), and the same of pTC with "
            "`qc.consistency: tta` (M's consistency under flips and contrast changes; '-' without it).\n\n"
            + qc_table + "\n")
    if gains:
        text += ("\n## Gain over the compute-matched control\n\n`{M+sup}+QC`: the same candidates given "
                 "refinement's supervised share alone, as many rounds (`full - {M+sup}+QC` is what QC brings).\n\n"
                 + format_table(["view", "site", "M", "{M+sup}+QC", "full", "full - {M+sup}+QC", "full - M"], gains)
                 + "\n")
    text += _privacy_section(config, run_dir)
    (run_dir / "report.md").write_text(text)
    return table + "\n\n" + qc_table + ("\n\n" + format_table(
        ["view", "site", "M", "{M+sup}+QC", "full", "full - {M+sup}+QC", "full - M"], gains) if gains else "")


def _privacy_section(config: Config, run_dir: Path) -> str:
    """``privacy``: the epsilon each site reported last (its own accountant) and the masked rounds."""
    import json

    from fedqc.core.table import format_table

    dp, masked = config.privacy.dp, config.privacy.secure_aggregation
    log_path = run_dir / "log.json"
    if (dp is None and not masked) or not log_path.is_file():
        return ""
    rows = json.loads(log_path.read_text())
    text = "\n## Privacy\n\n"
    if dp is not None:
        last: dict[str, dict] = {}
        for row in rows:
            for site, entry in (row.get("sites") or {}).items():
                metrics = entry.get("metrics") or {}
                if "dp-epsilon" in metrics:
                    spent = bool(last.get(site, {}).get("spent")) or bool(metrics.get("dp-budget-spent"))
                    last[site] = {"epsilon": metrics["dp-epsilon"], "spent": spent,
                                  "where": f"{row['phase']} {row['round']}"}
        text += (f"DP-SGD at the labelled sites (Opacus, RDP accountant, one patient per unit): budget epsilon "
                 f"{dp.epsilon:g}, max_grad_norm {dp.max_grad_norm:g}, refinement {dp.refinement}.\n\n"
                 + format_table(["site", "epsilon spent", "budget ran out", "last reported"],
                                [[site, round(v["epsilon"], 4), "yes" if v["spent"] else "no", v["where"]]
                                 for site, v in sorted(last.items())]) + "\n")
    if masked:
        secure = [row for row in rows if "secure_aggregation" in row]
        discarded = [f"{row['phase']} {row['round']}" for row in secure if row["secure_aggregation"].startswith("disc")]
        text += (f"\nSecure aggregation: {len(secure)} weight rounds, the coordinator receiving masked updates only"
                 + (f"; discarded (a participant missing): {', '.join(discarded)}" if discarded else "") + ".\n")
    return text


def _fmt(value) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def _qc_signal(config, site, view, cases, site_records, sup, ae, fences, own_pool_path, device) -> dict:
    """Flag quality under the fences used and under the site's own-pool fences; pseudo-label quality."""
    from fedqc.evaluation.variants import calibration, flag_quality
    from fedqc.qc.ood import flag_ood
    from fedqc.qc.scoring import score_cases
    from fedqc.qc.thresholds import Thresholds

    by_variant = {v: [r for r in site_records if r.variant == v] for v in ("M", "{M}+QC")}
    true_dice = np.array([r.rv_dice for r in by_variant["M"]])
    flags = np.array([r.ood for r in by_variant["{M}+QC"]])
    own = None
    if own_pool_path.is_file():
        scores = score_cases(sup, ae, cases, config.qc, device)
        own = flag_quality(flag_ood(scores.pdc, scores.phd, Thresholds.from_json(own_pool_path), scores.ptc),
                           true_dice)
    flagged = [r for r in by_variant["{M}+QC"] if r.ood]
    mean = (lambda xs: float(np.nanmean(xs)) if len(xs) else None)  # noqa: E731
    return {"view": view, "site": site, "fences": fences.source, "th_low_pdc": fences.th_low_pdc,
            "th_up_phd": fences.th_up_phd, "th_low_ptc": fences.th_low_ptc, "flags": flag_quality(flags, true_dice),
            "own_pool": own,
            "flagged_pred_rv_dice": mean([r.pred_rv_dice_grid for r in flagged]),
            "flagged_recon_rv_dice": mean([r.recon_rv_dice_grid for r in flagged]),
            "calibration": calibration(by_variant["M"], "M")}


def _gains(rows: Sequence[Mapping]) -> list[list]:
    by = {(r["view"], r["site"], r["variant"]): r["rv_dice"] for r in rows}
    out = []
    for view, site in sorted({(r["view"], r["site"]) for r in rows}):
        m, ctl, full = (by.get((view, site, v)) for v in ("M", "{M+sup}+QC", "full"))
        if ctl is not None and full is not None:
            out.append([view, site, m, ctl, full, round(full - ctl, 3), round(full - m, 3)])
    return out
