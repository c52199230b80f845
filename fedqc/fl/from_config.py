"""From a fedqc config to the federation's settings, and from a finished run to its report.

Flower-free glue between ``fedqc.config`` (what users write) and ``fedqc.fl`` (the plumbing):
sites become node configs, the method's settings are flattened into the run config every site
builds its :class:`fedqc.site.algorithm.FedqcSite` from, and the protocol's rounds come from the
``federation`` / ``train`` / ``refine`` sections.

The report (simulation, where the coordinator may read every site's test labels because they are
all on this machine) scores each site's held-out test cases with M (best supervised global
model), {M}+QC (selection among the m_best supervised models) and full (selection among the
refined models), as the paper's ablation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedqc.config import Config, SiteConfig, to_dict
from fedqc.fl.settings import FederationSettings
from fedqc.site.algorithm import encode_value, flatten
from fedqc.site.contract import Scalar, candidate_prefix


def node_config(site: SiteConfig, views: tuple[str, ...], device: str | None = None) -> dict[str, Scalar]:
    """A site as the flat node config its SuperNode (or virtual node) starts with."""
    node: dict[str, Scalar] = {"site-id": site.name, "root": str(site.root), "filter": encode_value(dict(site.filter)),
                               "labelled": site.labelled, "layout": site.layout, "test-fraction": site.test_fraction,
                               "views": ",".join(views)}
    if site.label_remap:
        node["label-remap"] = encode_value({int(k): v for k, v in site.label_remap.items()})
    if device:
        node["device"] = device
    return node


def site_run_config(config: Config) -> dict[str, Scalar]:
    """The method's settings every site receives (no sites, no paths of the coordinator)."""
    data = to_dict(config)
    for key in ("sites", "simulated"):
        data.pop(key, None)
    return flatten(data)


def federation_settings(config: Config, audit: bool = False) -> FederationSettings:
    fed = config.federation
    return FederationSettings(
        supervised_rounds=fed.supervised_rounds, ae_rounds=fed.ae_rounds, refine_rounds=config.refine.k_semi,
        local_epochs=fed.local_epochs, strategy=fed.strategy,
        proximal_mu=fed.proximal_mu if fed.strategy == "fedprox" else 0.0, m_best=config.train.m_best,
        alpha=config.refine.alpha, min_sites=fed.min_sites, node_wait_s=fed.timeout_s,
        round_timeout_s=max(fed.timeout_s, 60.0),
        transfer_dtype="bfloat16" if fed.half_precision_transfer else "float32",
        refine_aggregation=fed.refine_aggregation, aggregation=fed.aggregation, trim_fraction=fed.trim_fraction,
        norm_factor=fed.norm_factor,
        seed=config.train.seed, site_run_config=site_run_config(config), audit_replies=audit)


# -- the report ----------------------------------------------------------------------------------


def _models(config: Config, weights: Mapping[str, np.ndarray], prefix: str, device: torch.device):
    from fedqc.models.factory import new_autoencoder, new_segmenter

    module = new_autoencoder(config) if prefix.startswith("ae/") else new_segmenter(config)
    state = {k[len(prefix):]: torch.as_tensor(v) for k, v in weights.items() if k.startswith(prefix)}
    module.load_state_dict(state)
    return module.to(device).eval()


def federated_report(config: Config, run_dir: Path, progress=print) -> str:
    """Per-site ablation table of a finished simulated run; writes ``RUN/report.md`` and ``.json``."""
    from fedqc.core.device import select_device
    from fedqc.core.io import write_json
    from fedqc.core.table import format_table
    from fedqc.data.site import load_site_split
    from fedqc.evaluation.variants import score_case_variants, summarise_variants
    from fedqc.fl import run_state
    from fedqc.qc.thresholds import Thresholds

    device = select_device(config.train.device)
    state = run_state.read_json(run_dir / run_state.STATE)
    final = run_state.load_arrays(run_dir / state["weights"])
    rounds = state.get("candidates") or []
    supervised = [run_state.load_arrays(run_state.supervised_checkpoint(run_dir, r)) for r in rounds]
    records = []
    for view in config.views:
        m = sum(1 for i in range(len(final)) if any(k.startswith(f"{candidate_prefix(i)}seg/{view}/") for k in final))
        refined = [_models(config, final, f"{candidate_prefix(i)}seg/{view}/", device) for i in range(m)]
        sup = [_models(config, w, f"seg/{view}/", device) for w in supervised] or refined[:1]
        ae = _models(config, final, f"ae/{view}/", device)
        for p in ae.parameters():
            p.requires_grad_(False)
        for site in config.sites:
            fences = run_dir / "sites" / site.name / "thresholds" / f"{view}.json"
            if not fences.is_file():
                continue
            th = Thresholds.from_json(fences)
            split = load_site_split(site, view, config, progress=None)
            for case in split.test:
                records += score_case_variants(config, site.name, case, {
                    "M": (sup[:1], False), "{M}+QC": (sup, True), "full": (refined, True)}, ae, th, device)
            if progress:
                progress(f"  report: scored {len(split.test)} {view} test cases of {site.name}")
    rows = summarise_variants(records)
    write_json(run_dir / "report.json", {"summary": rows, "cases": [r.__dict__ for r in records]})
    table = format_table(["view", "site", "variant", "n", "RV Dice", "RV HD mm", "RV Dice (LCC)", "RV HD mm (LCC)",
                          "flagged"],
                         [[r["view"], r["site"], r["variant"], r["n"], r["rv_dice"], round(r["rv_hd_mm"], 2),
                           r["rv_dice_lcc"], round(r["rv_hd_mm_lcc"], 2), r["flagged"]] for r in rows])
    (run_dir / "report.md").write_text("# fedqc federated run: per-site ablation on held-out test subjects\n\n"
                                       + table + "\n")
    return table
