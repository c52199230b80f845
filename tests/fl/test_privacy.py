"""Privacy: every reply a site sent during full simulated runs holds only what may leave a site.

Allowed: weight arrays named and shaped like the model's parameters (``seg/SA/...``,
``ae/SA/...``, ``m<i>/seg/SA/...``), metrics whose keys are in ALLOWED_METRIC_KEYS with number
values, the control record (the site's own name, the needs-autoencoder flag), and error replies
that name an exception type without its message. The audit is written by the ClientApp's mod
after the reply is built (``RUN/audit/<site>.jsonl``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedqc.fl import records
from fedqc.fl.settings import DEFAULT_NORM_PATTERN
from fedqc.site.contract import ALLOWED_METRIC_KEYS, candidate_prefix
from tests.fl import toy

pytestmark = pytest.mark.slow
WIRE_DTYPES = {"float32", "float16", "bfloat16", "int64"}


def model_parameters(m_best: int) -> dict[str, list[int]]:
    """Name -> shape of every array the toy model may send."""
    seg = {k: list(v.shape) for k, v in toy._state(toy._segmenter(), toy.SEG).items()}
    shapes = {**seg, **{k: list(v.shape) for k, v in toy._state(toy._autoencoder(), toy.AE).items()}}
    for i in range(m_best):
        shapes.update({candidate_prefix(i) + k: v for k, v in seg.items()})
    return shapes


def audit_problems(entry: dict, site: str, parameters: dict[str, list[int]], local_pattern: str = "") -> list[str]:
    """Everything in one audited reply that must not have left the site."""
    problems = []
    if "error" in entry:
        reason = str(entry["error"]["reason"])
        if not re.fullmatch(rf"site {re.escape(site)}: \w+ during [\w-]+ \(details in the site's log\)", reason):
            problems.append(f"error reason says more than the exception type: {reason!r}")
        return problems
    for name, record in entry["records"].items():
        kind, items = record["type"], record["items"]
        if name not in records.REPLY_RECORDS:
            problems.append(f"unexpected record {name!r}")
        elif name == records.WEIGHTS and kind == "ArrayRecord":
            for key, array in items.items():
                if key not in parameters:
                    problems.append(f"array {key!r} is not a model parameter")
                elif array["shape"] != parameters[key] or array["dtype"] not in WIRE_DTYPES:
                    problems.append(f"array {key!r} has shape {array['shape']} / dtype {array['dtype']}")
                if local_pattern and re.search(local_pattern, key) and not key.startswith("ae/"):
                    problems.append(f"site-local (FedBN) array {key!r} left the site")
        elif name in (records.METRICS, records.VAL_METRICS) and kind == "MetricRecord":
            for key, value in items.items():
                if key not in ALLOWED_METRIC_KEYS or value["type"] not in ("int", "float"):
                    problems.append(f"metric {key!r} ({value['type']}) is not allowed")
        elif name == records.CONTROL and kind == "ConfigRecord":
            for key, value in items.items():
                ok = (key == records.SITE_ID and value["value"] == site) or (
                    key == records.NEEDS_AE and value["type"] == "bool") or (  # secure aggregation's X25519 key
                    key == records.SECAGG_KEY and re.fullmatch(r"[0-9a-f]{64}", str(value["value"])) is not None)
                if not ok:
                    problems.append(f"control entry {key!r} = {value['value']!r} is not allowed")
        else:
            problems.append(f"record {name!r} has type {kind}")
    return problems


def read_audit(run_dir: Path) -> dict[str, list[dict]]:
    return {path.stem: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((run_dir / "audit").glob("*.jsonl"))}


def test_only_parameters_and_allowed_metrics_left_any_site(audited_run):
    audit = read_audit(audited_run)
    assert set(audit) == {"A", "B", "C", "L"}
    parameters = model_parameters(m_best=2)
    problems = [f"{site} {entry['task']}: {p}" for site, entries in audit.items() for entry in entries
                for p in audit_problems(entry, site, parameters,
                                        DEFAULT_NORM_PATTERN if entry["task"] != "init" else "")]
    assert problems == []
    for site, entries in audit.items():
        tasks = {e["task"] for e in entries}
        assert {"init", "supervised", "evaluate", "qc-autoencoder", "refine", "predict"} <= tasks, site
    sent = [k for entries in audit.values() for e in entries if "records" in e
            for k in e["records"].get("weights", {}).get("items", {})]
    assert sent and not any("images" in k for k in sent)
    leaks = [e for e in audit["L"] if e["task"] == "supervised"]
    assert leaks and all("error" in e for e in leaks)  # L's algorithm tried to send its images: refused
    dtypes = {a["dtype"] for entries in audit.values() for e in entries if "records" in e and e["task"] != "init"
              for a in e["records"].get("weights", {}).get("items", {}).values()}
    assert dtypes == {"bfloat16"}  # BatchNorm's int64 counter is site-local under FedBN


def test_failing_sites_leak_no_exception_details(failed_then_resumed_run):
    run_dir, _ = failed_then_resumed_run
    audit = read_audit(run_dir)
    errors = [e for e in audit["B"] if "error" in e]
    assert len(errors) == 1
    parameters = model_parameters(m_best=1)
    assert [p for site, entries in audit.items() for e in entries for p in audit_problems(e, site, parameters)] == []


def test_the_audit_check_catches_what_must_not_leave():
    parameters = model_parameters(m_best=1)
    bad = {"task": "supervised", "records": {
        "weights": {"type": "ArrayRecord", "items": {
            "seg/SA/images": {"dtype": "float32", "shape": [24, 1, 16, 16], "nbytes": 1},
            "seg/SA/conv.weight": {"dtype": "float32", "shape": [9, 9], "nbytes": 1}}},
        "metrics": {"type": "MetricRecord", "items": {"case-0001-dice": {"type": "float", "value": 0.8}}},
        "control": {"type": "ConfigRecord", "items": {"site-id": {"type": "str", "value": "other"},
                                                      "path": {"type": "str", "value": "/data"}}},
        "masks": {"type": "ArrayRecord", "items": {}}}}
    assert len(audit_problems(bad, "A", parameters)) == 6
    error = {"task": "refine", "error": {"code": 2, "reason": "Traceback ... /data/A/patient.nii.gz"}}
    assert audit_problems(error, "A", parameters)


def test_the_allow_list_is_exactly_the_reviewed_keys():
    """A new key that may leave a site is a privacy decision: it must be added here on purpose.
    The consortium fences add per view only four quartiles and a count (never per-case scores)."""
    counts = {"num-examples", "num-cases", "num-flagged", "num-labelled"}
    # REFINE: the same slice and flag counts per view (a view is averaged over the sites that trained it).
    counts |= {f"num-{kind}-{view}" for kind in ("examples", "labelled", "flagged") for view in ("SA", "LA")}
    training = {"train-loss", "sup-loss", "semi-loss", "val-loss", "val-dice", "val-rv-dice", "alpha", "seconds"}
    fences = {f"fence-{view}-{stat}" for view in ("SA", "LA") for stat in ("n", "pdc_q1", "pdc_q3", "phd_q1", "phd_q3")}
    # qc.consistency: tta adds the two quartiles of pTC per view (a labelled site's scalars, like pDC's).
    fences |= {f"fence-{view}-{stat}" for view in ("SA", "LA") for stat in ("ptc_q1", "ptc_q3")}
    # privacy.dp: a site's spent epsilon (one scalar of its accountant) and the flag that its budget is spent.
    privacy = {"dp-epsilon", "dp-budget-spent"}
    assert ALLOWED_METRIC_KEYS == counts | training | fences | privacy
