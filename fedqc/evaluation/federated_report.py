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
from fedqc.core.types import candidate_prefix
from fedqc.models.factory import frozen_autoencoder, segmenters_from_states


def _state(weights: Mapping[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
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
    from fedqc.evaluation.variants import score_case_variants, summarise_variants
    from fedqc.qc.thresholds import Thresholds

    device = select_device(config.train.device)
    records = []
    for view in config.views:
        m = sum(1 for i in range(len(final)) if any(k.startswith(f"{candidate_prefix(i)}seg/{view}/") for k in final))
        refined = segmenters_from_states(config, [_state(final, f"{candidate_prefix(i)}seg/{view}/")
                                                  for i in range(m)], device)
        sup = segmenters_from_states(config, [_state(w, f"seg/{view}/") for w in supervised], device) or refined[:1]
        ae = frozen_autoencoder(config, _state(final, f"ae/{view}/"), device)
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
