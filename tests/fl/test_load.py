"""Load: 16 simulated sites in one simulation; a SuperLink with 8 real SuperNodes for several rounds.

The loopback run counts this process's open file descriptors, its child processes and the ports
before and after: nothing may leak.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from fedqc.fl import processes
from fedqc.fl.simulation import SimulationConfig, run_simulation
from tests.fl.conftest import toy_settings
from tests.fl.local import one_round_each, run_local_federation, toy_sites

pytestmark = pytest.mark.slow


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
    run_dir = run_simulation(SimulationConfig(sites=sites, federation=settings), tmp_path / "run")
    log = json.loads((run_dir / "log.json").read_text())
    assert [r["phase"] for r in log] == ["init", "supervised", "supervised", "supervised-evaluate",
                                         "qc-autoencoder", "refine", "predict"]
    for row in log[1:]:
        assert len(row["sites"]) == 16 and not row["missing"] and not row["failed"]
    supervised = log[1]
    assert sorted(supervised["aggregated_from"]) == sorted(s["site-id"] for s in sites if s["labelled"])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_eight_supernodes_several_rounds_leak_no_process_port_or_file(tmp_path):
    fds_before = _open_fds()
    children_before = set(processes.children(os.getpid()))
    run = run_local_federation(tmp_path / "run", toy_sites(8),
                               one_round_each(min_sites=8, supervised_rounds=2, refine_rounds=1),
                               echo=lambda _: None, max_seconds=1200)
    assert run.status["status"] == "finished:completed", run.status
    log = json.loads((run.run_dir / "log.json").read_text())
    assert [r["phase"] for r in log].count("supervised") == 2
    assert all(len(r["sites"]) == 8 and not r["missing"] and not r["failed"] for r in log[1:])
    assert len(run.ports) == 9 and len(run.pids) >= 2 * 9 + 1

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(processes.alive(p) for p in run.pids):
        time.sleep(0.2)
    assert [p for p in run.pids if processes.alive(p)] == []
    assert [p for p in run.ports if not processes.port_is_free("127.0.0.1", p)] == []
    assert set(processes.children(os.getpid())) - children_before == set()
    import gc

    gc.collect()
    assert _open_fds() - fds_before == set()
