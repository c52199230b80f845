"""Faults on loopback with real processes: the coordinator killed -9 mid-run, a site killed mid-round.

The coordinator runs as its own process (``run_server``, what ``fedqc-server`` calls after reading
its YAML) with the toy site algorithm; the sites are real SuperNodes. Every process a test started
is gone at the end and every port is free (the test checks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedqc.fl import processes
from fedqc.fl.launch import SuperNode
from fedqc.fl.settings import ClientSettings
from tests.fl.local import one_round_each, toy_sites, wait_until

pytestmark = pytest.mark.slow

SERVER = """
import sys
from pathlib import Path
from fedqc.fl.launch import run_server
from fedqc.fl.settings import FederationSettings, ServerSettings
run_dir, port, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume"
settings = ServerSettings(host="127.0.0.1", port=port, federation=FederationSettings.from_json(sys.argv[4]))
sys.exit(run_server(None, run_dir, True, settings=settings, resume=resume, max_seconds=600))
"""


@pytest.fixture(autouse=True)
def _no_orphans_left(tmp_path):
    """Whatever happens in a test, no process it started outlives it."""
    yield
    for pid in _started_here(tmp_path):
        processes.stop_tree(pid, grace_s=5)


def _server(tmp_path: Path, run_dir: Path, port: int, resume: bool) -> subprocess.Popen:
    log = open(tmp_path / f"server-{'resume' if resume else 'first'}.log", "w")  # noqa: SIM115 (closed by the OS)
    return subprocess.Popen([sys.executable, "-c", SERVER, str(run_dir), str(port), "resume" if resume else "new",
                             str(tmp_path / "federation.json")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _node(tmp_path: Path, site: dict, port: int) -> SuperNode:
    site_id = str(site["site-id"])
    settings = ClientSettings(site_id=site_id, superlink=f"127.0.0.1:{port}", work_dir=tmp_path / "sites" / site_id,
                              node_config={k: v for k, v in site.items() if k != "site-id"},
                              port=processes.free_port(), max_retries=100, max_wait_s=600)
    return SuperNode(settings, insecure=True).start()


def _log(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "log.json").read_text())
    except (OSError, ValueError):
        return []



def _crash(pid: int) -> list[int]:
    """kill -9 a process and all its descendants at once (freeze first, so none reacts)."""
    tree = processes.descendants(pid) + [pid]
    for p in tree:
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _stop(servers: list[subprocess.Popen], nodes: list[SuperNode]) -> list[int]:
    """Stop every coordinator process tree and SuperNode a test started; returns their PIDs."""
    pids = []
    for server in servers:
        pids += [server.pid, *processes.stop_tree(server, grace_s=5)]
    for node in nodes:
        node.stop()
        pids += [node.proc.pid, *node.stopped_pids]
    return pids


def _started_here(folder: Path) -> list[int]:
    """Live processes working in or naming ``folder`` (only this test starts such processes): finds
    daemons orphaned by a crashed parent, which no longer hang below any PID we hold."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (cwd.startswith(str(folder)) or str(folder) in cmdline) and processes.alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _assert_gone(pids: list[int], ports: list[int], folder: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(processes.alive(p) for p in pids + _started_here(folder)):
        time.sleep(0.2)
    assert [p for p in pids if processes.alive(p)] == []
    orphans = _started_here(folder)
    for pid in orphans:  # stop them before failing, so they cannot disturb later tests
        processes.stop_tree(pid, grace_s=5)
    assert orphans == []
    assert [p for p in ports if not processes.port_is_free("127.0.0.1", p)] == []


def test_coordinator_killed_mid_run_resumes_from_the_last_completed_round(tmp_path):
    run_dir, port = tmp_path / "run", processes.free_port()
    # No autoencoder or refine rounds: what is tested is the supervised rounds around the crash (the
    # later phases' resume: tests/fl/test_simulation.py); every exchange costs Flower's polls.
    one_round_each(min_sites=2, supervised_rounds=3, ae_rounds=0, refine_rounds=0, m_best=2, node_wait_s=120,
                   round_timeout_s=120).to_json(tmp_path / "federation.json")
    nodes = [_node(tmp_path, site, port) for site in toy_sites(2)]
    pids: list[int] = [n.proc.pid for n in nodes]
    servers: list[subprocess.Popen] = []
    try:
        servers.append(_server(tmp_path, run_dir, port, resume=False))
        wait_until(lambda: _state(run_dir).get("phase") == "supervised" and _state(run_dir)["phase_round"] == 2, 300,
              "two completed supervised rounds")
        state_before, log_before = _state(run_dir), _log(run_dir)
        pids += _crash(servers[0].pid)
        servers[0].wait(timeout=10)

        servers.append(_server(tmp_path, run_dir, port, resume=True))
        code = servers[1].wait(timeout=600)
        assert code == 0, (tmp_path / "server-resume.log").read_text()[-3000:]
    finally:
        pids += _stop(servers, nodes)
    log = _log(run_dir)
    saved = [r for r in log_before if r["server_round"] <= state_before["server_round"]]
    assert log[:len(saved)] == saved  # nothing saved before the crash was lost or rewritten
    if state_before["phase_round"] < 3:  # the crash came before round 3 was saved: round 3 ran after the resume
        assert (log[len(saved)]["phase"], log[len(saved)]["round"]) == ("supervised", state_before["phase_round"] + 1)
    rounds = [r["round"] for r in log if r["phase"] == "supervised" and "error" not in r]
    assert rounds == [1, 2, 3]  # each round once: the interrupted one re-run, none skipped
    assert [r["phase"] for r in log] == ["init"] + ["supervised"] * 3 + ["supervised-evaluate", "predict"]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["phase"] == "done"
    scored_before = {k: v for k, v in state_before["best"]["scores"].items() if v is not None}
    assert scored_before and all(state["best"]["scores"][k] == v for k, v in scored_before.items())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    for site in toy_sites(2):
        assert (tmp_path / "sites" / str(site["site-id"]) / "predictions.npz").is_file()
    _assert_gone(pids, [port] + [n.settings.port for n in nodes], tmp_path)


def test_a_site_killed_mid_round_is_named_the_round_finishes_and_the_site_rejoins(tmp_path):
    run_dir, port = tmp_path / "run", processes.free_port()
    # start_sites 3: the run starts with all three (a SuperNode slow to connect would otherwise leave
    # site1 and one other as the round's only targets, and killing site1 leaves one answer of two).
    one_round_each(min_sites=2, start_sites=3, supervised_rounds=3, ae_rounds=0, refine_rounds=0, node_wait_s=120,
                   round_timeout_s=60).to_json(tmp_path / "federation.json")
    sites = toy_sites(3)
    sites[1].update({"delay-s": 300.0, "delay-task": "supervised"})
    nodes = [_node(tmp_path, site, port) for site in sites]
    pids: list[int] = [n.proc.pid for n in nodes]
    victim = tmp_path / "sites" / "site1"
    servers: list[subprocess.Popen] = []
    try:
        servers.append(_server(tmp_path, run_dir, port, resume=False))
        wait_until(lambda: (victim / "busy").is_file(), 300, "site1 to start its supervised work")
        pids += _crash(nodes[1].proc.pid)
        (victim / "delayed").write_text("killed")  # the restarted site works at normal speed
        wait_until(lambda: any(r["phase"] == "supervised" for r in _log(run_dir)), 300, "the round to finish")
        nodes.append(_node(tmp_path, sites[1], port))  # site1 rejoins
        code = servers[0].wait(timeout=600)
        assert code == 0, (tmp_path / "server-first.log").read_text()[-3000:]
    finally:
        pids += _stop(servers, nodes)
    log = _log(run_dir)
    first = next(r for r in log if r["phase"] == "supervised")
    assert "site1" in first["missing"] + list(first["failed"])
    assert first["seconds"] < 120  # ended at its 60 s deadline (plus Flower's polls), not waiting for the dead site
    assert sorted(first["aggregated_from"]) == ["site0"]  # site2 is unlabelled: nothing to aggregate
    assert "site1" in json.dumps(first) and first["sites"].keys() >= {"site0", "site2"}
    named = [n for r in log for n in list(r.get("failed", {})) + r.get("missing", [])]
    assert named and set(named) == {"site1"}  # a failure the SuperLink reports is named by the site it concerns
    later = [r for r in log[log.index(first) + 1:] if "site1" in r.get("sites", {})]
    assert later, "the restarted site never took part again"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    _assert_gone(pids, [port] + [n.settings.port for n in nodes], tmp_path)
