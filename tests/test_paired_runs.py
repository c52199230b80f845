"""benchmarks/paired_runs.py on federated reports (docs/results' committed ``fedqc simulate`` runs):
cases pair by (seed, case), never across seeds, and the table's means are those of the reports."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "results" / "qc_signal" / "v2" / "sequential_fresh_install"
SEEDS = [RUNS / f"seed{s}.json" for s in range(3)]


@pytest.fixture(scope="module")
def paired():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return runpy.run_path(str(ROOT / "benchmarks" / "paired_runs.py"))
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| centre")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_federated_reports_pair_by_seed_and_case(paired, capsys):
    spec = ",".join(str(p) for p in SEEDS)
    paired["main"]([spec, "full", spec, "{M+sup}+QC", "--all-sites"])
    rows = _rows(capsys.readouterr().out)
    reports = [json.loads(p.read_text()) for p in SEEDS]
    assert set(rows) == {"centre1-siemens", "centre2-philips", "centre3-ge", "centre4-siemens"}
    for site, (a, b, n, *_rest) in rows.items():
        full = [(s, c["case_id"], c["rv_dice"]) for s, r in enumerate(reports) for c in r["cases"]
                if (c["site"], c["view"], c["variant"]) == (site, "SA", "full")]
        control = {(s, c["case_id"]): c["rv_dice"] for s, r in enumerate(reports) for c in r["cases"]
                   if (c["site"], c["view"], c["variant"]) == (site, "SA", "{M+sup}+QC")}
        assert int(n) == len(full) == len(control)  # one pair per (seed, case): same case ids across seeds stay apart
        assert len({c for _, c, _ in full}) < len(full)
        assert float(a) == pytest.approx(np.mean([d for _, _, d in full]), abs=5e-4)
        assert float(b) == pytest.approx(np.mean(list(control.values())), abs=5e-4)
    # Without --all-sites: the sites with an unlabelled pool only.
    paired["main"]([spec, "full", spec, "full"])
    assert set(_rows(capsys.readouterr().out)) == {"centre3-ge", "centre4-siemens"}


def test_federated_runs_with_different_seed_counts_are_refused(paired):
    with pytest.raises(SystemExit, match="one per seed"):
        paired["main"]([",".join(str(p) for p in SEEDS), "full", f"{SEEDS[0]},{SEEDS[1]}", "full"])
