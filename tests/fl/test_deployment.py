"""Deployment on loopback: a real SuperLink and real SuperNodes with TLS + site keys.

The federation runs one round per phase with the toy site algorithm, then every process the
test started (daemons, their superexec children, ``flwr run``) must be gone and every port free.
The insecure deployment (8 SuperNodes, Flower's cost per exchange, bytes per client per round) is
``tests/fl/test_load.py::test_eight_supernodes_every_phase_leak_no_process_port_or_file``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedqc.core.errors import FedqcError
from fedqc.fl import certs, processes
from fedqc.fl.launch import SuperLink, SuperNode, run_client, run_server
from fedqc.fl.settings import ClientSettings, ServerSettings
from tests.fl.local import one_round_each, run_local_federation, toy_sites

pytestmark = pytest.mark.slow
PHASES = ["init", "supervised", "supervised-evaluate", "qc-autoencoder", "refine", "predict"]


def _assert_clean(pids, ports):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(processes.alive(p) for p in pids):
        time.sleep(0.2)
    assert [p for p in pids if processes.alive(p)] == []
    assert [p for p in ports if not processes.port_is_free("127.0.0.1", p)] == []


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace") and processes.alive(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def _check_run(run, sites):
    assert run.status["status"] == "finished:completed", run.status
    phases = [r["phase"] for r in json.loads((run.run_dir / "log.json").read_text())]
    assert phases == PHASES
    assert run.summary["status"] == "completed"
    for site in sites:
        assert (run.run_dir / "sites" / str(site["site-id"]) / "predictions.npz").is_file()
    _assert_clean(run.pids, run.ports)
    assert len(run.pids) >= 2 * (1 + len(sites)) + 1  # each daemon, its superexec, and `flwr run`


def test_tls_with_site_authentication(tmp_path):
    sites = toy_sites(2)
    run = run_local_federation(tmp_path / "run", sites, one_round_each(min_sites=2), tls=True, auth=True,
                               echo=lambda _: None)
    _check_run(run, sites)
    config = (tmp_path / "run" / ".flwr" / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config
    # Keys are read from their paths, never copied into logs, configs or messages.
    pki = tmp_path / "run" / "pki"
    secrets = {line for key in pki.rglob("*") if key.is_file() and "PRIVATE KEY" in key.read_text(errors="ignore")
               for line in key.read_text().splitlines() if len(line) > 40 and "PRIVATE KEY" not in line}
    assert len(secrets) > 4
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and pki not in path.parents:
            text = path.read_bytes().decode(errors="ignore")
            assert not any(line in text for line in secrets), f"{path} holds private key material"
    private = [p for p in pki.rglob("*") if p.is_file() and "PRIVATE KEY" in p.read_text(errors="ignore")]
    assert len(private) == 4 and all(p.stat().st_mode & 0o077 == 0 for p in private)  # certificates stay public


def test_an_unregistered_site_is_refused(tmp_path):
    tls = certs.make_tls_files(tmp_path / "pki")
    _, registered = certs.make_site_key(tmp_path / "keys", "known")
    intruder_key, _ = certs.make_site_key(tmp_path / "keys", "intruder")
    settings = ServerSettings(port=processes.free_port(), tls=tls, site_public_keys=(registered,))
    with SuperLink(tmp_path / "run", settings, insecure=False) as link:
        node = SuperNode(ClientSettings(site_id="intruder", superlink=link.address, work_dir=tmp_path / "intruder",
                                        root_certificates=tls.ca_cert, private_key=intruder_key,
                                        port=processes.free_port(), max_retries=0), insecure=False)
        node.spawn()
        try:
            code = node.proc.wait(timeout=60)
        finally:
            node.stop()
    assert code != 0 and "[code: 2004] Failed to activate SuperNode" in node.log_path.read_text()
    _assert_clean(link.stopped_pids + node.stopped_pids, [settings.port])


def test_run_server_reports_a_failed_run_and_cleans_up(tmp_path):
    settings = ServerSettings(port=processes.free_port(), federation=one_round_each(min_sites=1, node_wait_s=3))
    code = run_server(None, tmp_path / "run", insecure=True, settings=settings, echo=lambda _: None)
    assert code == 1
    status = json.loads((tmp_path / "run" / "flower-run.json").read_text())
    assert status["status"] == "finished:failed"
    assert "only 0 of the 1 required sites connected within 3 s" in status["status-details"]
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log[-1]["phase"] == "init" and "error" in log[-1]
    time.sleep(1)
    assert _processes_mentioning(str(tmp_path / "run")) == []
    assert processes.port_is_free("127.0.0.1", settings.port)


def test_run_client_gives_up_on_an_unreachable_server(tmp_path):
    settings = ClientSettings(site_id="lonely", superlink=f"127.0.0.1:{processes.free_port()}",
                              work_dir=tmp_path / "site", port=processes.free_port(), max_retries=1, max_wait_s=5)
    started = time.monotonic()
    assert run_client(None, insecure=True, settings=settings) != 0
    assert time.monotonic() - started < 60
    assert _processes_mentioning(str(tmp_path / "site")) == []


def test_a_port_in_use_is_named(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        link = SuperLink(tmp_path / "run", ServerSettings(port=port), insecure=True)
        with pytest.raises(FedqcError, match=f"port {port} on 127.0.0.1 is already in use"):
            link.start()
    assert link.proc is None
