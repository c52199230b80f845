"""Load: 16 simulated sites in one simulation; a SuperLink with 8 real SuperNodes through every phase.

The loopback run is also the insecure deployment test: every phase completes, each site keeps its
predictions, and this process's open file descriptors, its child processes and the ports are
counted before and after: nothing may leak. It measures Flower's cost per exchange and the bytes
per client per round (printed, and written to ``figures.json`` in the test's folder).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fedqc.fl import processes
from fedqc.fl.simulation import SimulationConfig, run_simulation
from tests.fl.conftest import toy_settings
from tests.fl.local import one_round_each, run_local_federation, toy_sites
from tests.fl.toy import toy_nodes

pytestmark = pytest.mark.slow


def exchange_figures(run_dir: Path) -> dict:
    """Wall time per exchange vs the sites' own work, and bytes per client per round."""
    rows = [r for r in json.loads((run_dir / "log.json").read_text()) if "error" not in r]
    figures = []
    for row in rows:
        local = max((s["metrics"].get("seconds", 0) + s["val_metrics"].get("seconds", 0)
                     for s in row["sites"].values()), default=0.0)
        figures.append({"phase": row["phase"], "exchange_s": row["seconds"], "local_work_s": round(local, 3),
                        "overhead_s": round(row["seconds"] - local, 3), "sent_bytes_per_site": row["sent_bytes_per_site"],
                        "reply_bytes": max((s["reply_bytes"] for s in row["sites"].values()), default=0),
                        "model_bytes": row["model_bytes"]})
    return {"exchanges": figures,
            "mean_overhead_s": round(sum(f["overhead_s"] for f in figures) / len(figures), 2),
            "local_work_s": round(sum(f["local_work_s"] for f in figures), 2),
            "exchange_s": round(sum(f["exchange_s"] for f in figures), 2)}


def _open_fds() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used
            pass
    return found


def test_sixteen_simulated_sites_in_one_simulation(tmp_path):
    sites = [{"site-id": f"s{i:02d}", "seed": i, "shift": 0.1 * i, "labelled": i % 4 != 3, "flag-below": 0.99}
             for i in range(16)]
    settings = toy_settings(min_sites=16, supervised_rounds=2, refine_rounds=1)
    run_dir = run_simulation(SimulationConfig(sites=toy_nodes(sites), federation=settings), tmp_path / "run")
    log = json.loads((run_dir / "log.json").read_text())
    assert [r["phase"] for r in log] == ["init", "supervised", "supervised", "supervised-evaluate",
                                         "qc-autoencoder", "refine", "predict"]
    for row in log[1:]:
        assert len(row["sites"]) == 16 and not row["missing"] and not row["failed"]
    supervised = log[1]
    assert sorted(supervised["aggregated_from"]) == sorted(s["site-id"] for s in sites if s["labelled"])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_eight_supernodes_every_phase_leak_no_process_port_or_file(tmp_path):
    fds_before = _open_fds()
    children_before = set(processes.children(os.getpid()))
    sites = toy_sites(8)
    run = run_local_federation(tmp_path / "run", sites,
                               one_round_each(min_sites=8),
                               echo=lambda _: None, max_seconds=1200)
    assert run.status["status"] == "finished:completed", run.status
    log = json.loads((run.run_dir / "log.json").read_text())
    assert [r["phase"] for r in log] == ["init", "supervised", "supervised-evaluate", "qc-autoencoder", "refine",
                                         "predict"]
    assert all(len(r["sites"]) == 8 and not r["missing"] and not r["failed"] for r in log[1:])
    assert run.summary is not None and run.summary["status"] == "completed"
    for site in sites:
        assert (run.run_dir / "sites" / str(site["site-id"]) / "predictions.npz").is_file()
    assert len(run.ports) == 9 and len(run.pids) >= 2 * 9 + 1  # each daemon, its superexec, and `flwr run`

    figures = exchange_figures(run.run_dir)
    figures.update(wall_s=round(run.seconds, 1), network=run.status.get("network-traffic"))
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=2))
    print("\ndeployment figures:", json.dumps(figures, indent=1))
    assert figures["mean_overhead_s"] > 1.0  # Flower's fixed cost per exchange (a fresh process per message)

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(processes.alive(p) for p in run.pids):
        time.sleep(0.2)
    assert [p for p in run.pids if processes.alive(p)] == []
    assert [p for p in run.ports if not processes.port_is_free("127.0.0.1", p)] == []
    assert set(processes.children(os.getpid())) - children_before == set()
    import gc

    gc.collect()
    assert _open_fds() - fds_before == set()
