"""What the coordinator says while it runs: one line per round, a time table per phase at the end.

``[supervised] round 2/3: 3/3 sites answered, val Dice of round 1 0.812, 41.2 s`` — from the row the
protocol writes to ``RUN/log.json`` (:meth:`fedqc.fl.protocol.Federation._record`), so what the
terminal says and what the log keeps are the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedqc.core.table import format_table
from fedqc.site.contract import MetricKey


def _weighted(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total else None


def round_line(row: Mapping[str, Any], rounds: int) -> str:
    """One line for a round of ``RUN/log.json`` (``rounds``: the phase's planned rounds)."""
    sites = row.get("sites", {})
    failed, missing = dict(row.get("failed", {})), list(row.get("missing", []))
    expected = len(sites) + len(failed) + len(missing)
    k = max(int(row.get("round", 1)), 1) if row["phase"] != "supervised-evaluate" else 1
    parts = [f"{len(sites)}/{expected} sites answered"]
    if row.get("val_score") is not None:
        of = row.get("val_score_of_round")
        parts.append(f"mean val Dice{f' of round {of}' if of else ''} {row['val_score']:.3f}")
    if "num_flagged" in row:
        parts.append(f"flagged {sum(row['num_flagged'].values())} case(s)")
    elif row["phase"] == "qc-autoencoder":
        loss = _weighted([(float(s["metrics"][MetricKey.TRAIN_LOSS.value]),
                           float(s["metrics"].get(MetricKey.NUM_EXAMPLES.value, 1)))
                          for s in sites.values() if MetricKey.TRAIN_LOSS.value in s.get("metrics", {})])
        if loss is not None:
            parts.append(f"train loss {loss:.4f}")
    half = row.get("supervised_half")
    if half is not None:  # refine_aggregation sequential: the round's second exchange
        parts.append(f"then the supervised step of {len(half.get('aggregated_from', []))} labelled site(s)")
        lost = sorted({*half.get("failed", {}), *half.get("missing", [])})
        if lost:
            parts.append("supervised step without: " + ", ".join(lost))
    if failed:
        parts.append("failed: " + ", ".join(sorted(failed)))
    if missing:
        parts.append("no reply: " + ", ".join(missing))
    return f"[{row['phase']}] round {k}/{max(rounds, k)}: " + ", ".join(parts) + f", {row.get('seconds', 0):.1f} s"


def phase_table(summary: Mapping[str, Any]) -> str:
    """The summary's time per phase (rounds, seconds, seconds per round, share of the run)."""
    total = float(summary.get("seconds", 0)) or 1.0
    phases = summary.get("phases", {})
    rows = [[phase, entry["rounds"], f"{entry['seconds']:.1f}", f"{entry['seconds'] / max(entry['rounds'], 1):.1f}",
             f"{100 * entry['seconds'] / total:.0f}%"] for phase, entry in phases.items()]
    rows.append(["total", sum(e["rounds"] for e in phases.values()), f"{total:.1f}", "", "100%"])
    return format_table(["phase", "rounds", "seconds", "s/round", "share"], rows)
