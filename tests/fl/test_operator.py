"""What the coordinator's and the hospital's operators see and live through (issue 15), with real processes.

``fedqc-server`` / ``fedqc-client`` run as their installed commands (or ``run_server`` in-process where
the point is the run itself) against real SuperLinks / SuperNodes on 127.0.0.1: a resumed run with
site keys, a client that cannot join (and says why), a coordinator restarted under a connected
client, a second coordinator on a live run folder, SIGTERM / SIGHUP of either command, a failed
federation on the terminal. Every test checks that no process it started outlives it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedqc.fl import certs, processes
from fedqc.fl.launch import SuperLink, SuperNode, run_server
from fedqc.fl.settings import ClientSettings, FederationSettings, ServerSettings
from tests.fl.local import wait_until
from tests.fl.toy import ALGORITHM

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _no_orphans_left(tmp_path):
    """No process a test started (they all work in or name its folder) outlives it."""
    yield
    leftovers = {pid: " ".join(_names([pid])) for pid in _started_here(tmp_path)}
    for pid in leftovers:
        processes.stop_tree(pid, grace_s=5)
    assert leftovers == {}, f"processes left running: {leftovers}"


def _started_here(folder: Path) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(entry.name) != os.getpid() and (cwd.startswith(str(folder)) or str(folder) in cmdline) \
                and processes.alive(int(entry.name)):
            found.append(int(entry.name))
    return found



def _command(tmp_path: Path, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """An installed fedqc command as its own process; stdout and stderr to ``tmp_path/<name>.out``."""
    out = tmp_path / f"{name}.out"
    with open(out, "w") as handle:
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=handle, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
    return proc, out


def _site_yaml(tmp_path: Path, name: str, **keys) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    site = {"site": {"name": name, "root": str(data)}, "work_dir": str(tmp_path / "sites" / name),
            "port": processes.free_port(), **keys}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in site.items()}))
    return path


def _tree(pid: int) -> list[int]:
    return [pid, *processes.descendants(pid)]


def _names(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        try:
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].decode().rsplit("/", 1)[-1])
        except (OSError, IndexError):
            pass
    return names


def _workers(pids: list[int]) -> list[int]:
    """The site workers (``python -m fedqc.site.worker``) among ``pids`` (gone ones skipped)."""
    found = []
    for pid in pids:
        try:
            if b"fedqc.site.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def _init_only(**changes) -> FederationSettings:
    """The cheapest whole protocol: every site introduces itself (INIT), no training round."""
    base = {"supervised_rounds": 0, "ae_rounds": 0, "refine_rounds": 0, "predict": False, "m_best": 1,
            "min_sites": 1, "node_wait_s": 3, "round_timeout_s": 60}
    fields = {f.name for f in dataclasses.fields(FederationSettings)}
    base.update({k: v for k, v in {"fence_source": "unlabelled", "control": False}.items() if k in fields})
    return FederationSettings(**{**base, **changes})


def _toy_node(tmp_path: Path, site_id: str, superlink: str, tls=None, key: Path | None = None, **node) -> SuperNode:
    settings = ClientSettings(site_id=site_id, superlink=superlink, work_dir=tmp_path / "sites" / site_id,
                              root_certificates=tls.ca_cert if tls else None, private_key=key,
                              node_config={"site-algorithm": ALGORITHM, "seed": 1, **node},
                              port=processes.free_port(), max_retries=50, max_wait_s=120)
    return SuperNode(settings, insecure=tls is None)


def _spawn_once_listening(node: SuperNode, port: int):
    """Start ``node`` as soon as the SuperLink listens (sooner, it backs off for up to ~15 s between tries)."""
    import socket
    import threading

    def join() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        node.spawn()

    thread = threading.Thread(target=join, daemon=True)
    thread.start()
    return thread


# -- 1, 10, 12: a resumed run with site keys; what a failed and a completed federation print ------

def test_resume_with_site_keys_and_one_line_outcomes(tmp_path):
    tls = certs.make_tls_files(tmp_path / "pki")
    key, public = certs.make_site_key(tmp_path / "keys", "site0")
    port = processes.free_port()
    settings = ServerSettings(host="127.0.0.1", port=port, tls=tls, site_public_keys=(public,),
                              federation=_init_only())
    run_dir = tmp_path / "run"
    first: list[str] = []
    # Nobody joins within 3 s: the run stops with its state saved, as an interrupted one does.
    assert run_server(None, run_dir, insecure=False, settings=settings, echo=first.append) == 1
    assert (run_dir / "state.json").is_file()
    assert not [line for line in first if "Traceback" in line or line.startswith("  File ")], first
    assert first[-1].startswith("federation failed: only 0 of the 1 required sites connected within 3 s")
    assert "What to do: start the missing sites' fedqc-client" in first[-1]
    assert f"--run-dir {run_dir.resolve()} --resume" in first[-1]
    assert "Traceback" in (run_dir / "logs" / "flwr-run.log").read_text()  # the details are kept, in the log

    # The resume registers the same key again (Flower: code 23, already in use) and must go on; the
    # site with the key registered by the first run joins the resumed one.
    node = _toy_node(tmp_path, "site0", f"127.0.0.1:{port}", tls=tls, key=key)
    joiner = _spawn_once_listening(node, port)
    try:
        second: list[str] = []
        code = run_server(None, run_dir, insecure=False, settings=settings, resume=True, echo=second.append)
    finally:
        joiner.join(timeout=120)
        node.stop()
    assert code == 0, second
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert second[-1].startswith("federation completed: 1 exchanges in ") and "N/A" not in second[-1]


# -- 4: fedqc-client says on the terminal why it cannot join -----------------------------------

def test_a_client_that_cannot_join_says_why_and_what_to_do(tmp_path):
    tls = certs.make_tls_files(tmp_path / "pki")
    other_ca = certs.make_tls_files(tmp_path / "other-pki").ca_cert
    key, public = certs.make_site_key(tmp_path / "keys", "known")
    stranger, _ = certs.make_site_key(tmp_path / "keys", "stranger")
    settings = ServerSettings(host="127.0.0.1", port=processes.free_port(), tls=tls, site_public_keys=(public,))
    address = f"127.0.0.1:{settings.port}"
    cases = {
        "wrongca": ({"ca_cert": other_ca, "private_key": key},
                    "presented a certificate that your CA certificate does not vouch for"),
        "stranger": ({"ca_cert": tls.ca_cert, "private_key": stranger},
                     f"does not accept this site's key {stranger} (code 2004: not registered)"),
        "keyless": ({"ca_cert": tls.ca_cert}, "only admits registered sites, and this site has no key (code 2001)"),
        "wrongport": ({"ca_cert": tls.ca_cert, "private_key": key, "superlink": f"127.0.0.1:{processes.free_port()}",
                       "connect_timeout_s": 4}, "cannot reach the coordinator at 127.0.0.1:"),
    }
    with SuperLink(tmp_path / "run", settings, insecure=False):
        started = {}
        for name, (keys, _) in cases.items():
            config = _site_yaml(tmp_path, name, **{"superlink": address, **keys})
            started[name] = _command(tmp_path, name, ["fedqc-client", "--config", str(config)])
        codes = {name: proc.wait(timeout=120) for name, (proc, _) in started.items()}
    for name, (_, expected) in cases.items():
        out = started[name][1].read_text()
        assert codes[name] == 1, (name, out)
        lines = out.strip().splitlines()
        assert lines[-1].startswith("fedqc-client: error: ") and expected in lines[-1], (name, out)
        assert "Traceback" not in out
    assert "after 4 s" in started["wrongport"][1].read_text()

    # A malformed address or port is refused at config load, naming the key and the file.
    from fedqc.cli.main import client_main

    for keys, named in (({"superlink": "127.0.0.1"}, "'superlink'"), ({"port": 99999}, "'port'")):
        config = _site_yaml(tmp_path, "typo", ca_cert=str(tls.ca_cert), **keys)
        proc = subprocess.run([str(BIN / "fedqc-client"), "--config", str(config)], capture_output=True, text=True, check=False,
                              timeout=60, cwd=tmp_path)
        assert proc.returncode == 2 and str(config) in proc.stderr and named in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert client_main(["--config", str(config)]) == 2


def test_a_client_whose_coordinator_restarts_with_a_new_run_exits_non_zero_and_says_so(tmp_path):
    tls = certs.make_tls_files(tmp_path / "pki")
    key, public = certs.make_site_key(tmp_path / "keys", "site0")
    settings = ServerSettings(host="127.0.0.1", port=processes.free_port(), tls=tls, site_public_keys=(public,))
    config = _site_yaml(tmp_path, "site0", superlink=f"127.0.0.1:{settings.port}", ca_cert=str(tls.ca_cert),
                        private_key=str(key))
    with SuperLink(tmp_path / "run-a", settings, insecure=False):
        client, out = _command(tmp_path, "client", ["fedqc-client", "--config", str(config)])
        wait_until(lambda: "connected to the coordinator" in out.read_text(), 60, "the client to connect")
    # The coordinator comes back with a fresh run folder (a new SuperLink database), not a resume.
    with SuperLink(tmp_path / "run-b", settings, insecure=False):
        code = client.wait(timeout=120)
    text = out.read_text()
    assert code == 1, text
    assert "lost the connection to the coordinator" in text
    assert text.strip().splitlines()[-1].startswith("fedqc-client: error: the coordinator at ")
    assert "no longer knows this SuperNode" in text and "start fedqc-client again" in text


# -- 6, 7, 8, 10: one live coordinator; a second on its folder; old --resume form; SIGTERM ------

def test_a_second_server_on_a_live_run_folder_is_refused_and_sigterm_stops_every_process(tmp_path, write_config):
    from tests.conftest import tiny_config_dict

    method = write_config(tiny_config_dict(tmp_path / "nowhere", federation={"min_sites": 3, "timeout_s": 600}))
    run_dir = tmp_path / "run"
    server_yaml = tmp_path / "server.yaml"
    server_yaml.write_text(yaml.safe_dump({"method": str(method), "run_dir": str(run_dir), "host": "127.0.0.1",
                                           "port": processes.free_port()}))
    first, out = _command(tmp_path, "first", ["fedqc-server", "--config", str(server_yaml), "--insecure"])
    wait_until(lambda: "flwr-serverapp" in _names(_tree(first.pid)), 90, "the ServerApp to run")
    kept = {p: p.read_bytes() for p in [run_dir / "federation.json", run_dir / "server.yaml",
                                        run_dir / "app" / "pyproject.toml", run_dir / ".flwr" / "config.toml"]}

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(server_yaml.read_text()), "port": processes.free_port(),
                                     "startup_timeout_s": 5}))
    second = subprocess.run([str(BIN / "fedqc-server"), "--config", str(other), "--insecure"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, check=False)
    assert second.returncode == 2, second.stderr
    assert f"{run_dir.resolve()} is in use by another fedqc-server (PID {first.pid}" in second.stderr
    assert {p: p.read_bytes() for p in kept} == kept  # nothing of the live run was rewritten

    old_form = subprocess.run([str(BIN / "fedqc-server"), "--config", str(other), "--resume", str(run_dir)],
                              capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path)
    assert old_form.returncode == 2 and f"--run-dir {run_dir} --resume" in old_form.stderr

    tree = _tree(first.pid)
    assert {"flower-superlink", "flower-superexec", "flwr-serverapp", "flwr"} <= set(_names(tree))
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 128 + signal.SIGTERM
    wait_until(lambda: not [p for p in tree if processes.alive(p)], 15, "every process of the coordinator to stop")
    text = out.read_text()
    assert "stopped by SIGTERM" in text and f"--run-dir {run_dir.resolve()} (no round was saved" in text
    assert "Traceback" not in text


# -- 7: SIGTERM / SIGHUP of fedqc-client leaves no SuperNode behind -----------------------------

def test_sigterm_or_sighup_of_a_client_stops_its_supernode(tmp_path):
    settings = ServerSettings(host="127.0.0.1", port=processes.free_port())
    with SuperLink(tmp_path / "run", settings, insecure=True):
        clients = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            config = _site_yaml(tmp_path, sig.name.lower(), superlink=f"127.0.0.1:{settings.port}")
            clients[sig] = _command(tmp_path, sig.name, ["fedqc-client", "--config", str(config), "--insecure"])
        for _, out in clients.values():
            wait_until(lambda out=out: "connected to the coordinator" in out.read_text(), 60, "the clients to connect")
        for sig, (proc, out) in clients.items():
            tree = _tree(proc.pid)
            assert {"flower-supernode", "flower-superexec"} <= set(_names(tree))
            assert len(_workers(tree)) == 1  # the site worker beside the SuperNode, stopped with it
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == 128 + sig
            wait_until(lambda tree=tree: not [p for p in tree if processes.alive(p)], 15, "the SuperNode to stop")
            assert f"stopped by {sig.name}" in out.read_text()


# -- 10: a site's failure on the coordinator's terminal ------------------------------------------

def test_a_failing_site_is_one_line_on_the_coordinators_terminal(tmp_path):
    port = processes.free_port()
    settings = ServerSettings(host="127.0.0.1", port=port, federation=_init_only(node_wait_s=60))
    node = _toy_node(tmp_path, "site0", f"127.0.0.1:{port}", **{"fail-task": "supervised"})
    joiner = _spawn_once_listening(node, port)
    try:
        lines: list[str] = []
        assert run_server(None, tmp_path / "run", insecure=True, settings=settings, echo=lines.append) == 1
    finally:
        joiner.join(timeout=120)
        node.stop()
    assert not [line for line in lines if "Traceback" in line or line.startswith(("  File ", "RuntimeError"))], lines
    assert any("site site0: RuntimeError during init" in line for line in lines)  # Flower's warning, kept
    assert lines[-1].startswith("federation failed: init: only 0 of the required 1 sites answered") \
        and "'site0'" in lines[-1]
    assert "What to do: each failed site's reason is in its own log" in lines[-1]
    assert "toy failure reading /private/site0" not in "\n".join(lines)  # a site's details stay at the site


# -- fedqc-client check: everything a site can check before joining -----------------------------

def test_check_before_joining_reports_every_problem(tmp_path, tiny_data, write_config, capsys):
    import shutil

    from fedqc.cli.main import client_main
    from tests.conftest import tiny_config_dict

    tls = certs.make_tls_files(tmp_path / "pki")
    other_ca = certs.make_tls_files(tmp_path / "other-pki").ca_cert
    key, public = certs.make_site_key(tmp_path / "keys", "centre1")
    stranger, _ = certs.make_site_key(tmp_path / "keys", "stranger")
    method = write_config(tiny_config_dict(tiny_data), "method.yaml")
    broken = tmp_path / "broken-data"
    shutil.copytree(tiny_data, broken)
    bad_file = broken / "012" / "012_SA_ED.nii.gz"
    bad_file.write_bytes(bad_file.read_bytes()[:100])  # truncated
    settings = ServerSettings(host="127.0.0.1", port=processes.free_port(), tls=tls, site_public_keys=(public,))
    address = f"127.0.0.1:{settings.port}"

    def check(name: str, site: dict, *args: str, **keys) -> tuple[int, str]:
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"site": site, "superlink": address, "device": "cpu",
                                          "work_dir": str(tmp_path / name), **keys}))
        code = client_main(["check", "--config", str(config), "--method", str(method), *args])
        return code, capsys.readouterr().out

    with SuperLink(tmp_path / "run", settings, insecure=False):
        code, good = check("good", {"name": "centre1", "root": str(tiny_data), "filter": {"CENTRE": 1},
                                    "labelled": True}, "--try-join", ca_cert=str(tls.ca_cert), private_key=str(key))
        assert code == 0, good
        for expected in ("ok       data SA: 16 cases of 8 subjects (16 with a label file), all readable",
                         "ok       data LA:", "ok       site key:", "ok       tls: " + address,
                         "ok       registration: the coordinator at " + address + " admitted this site",
                         "ok       device: cpu", "ms per slice forward+backward on cpu",
                         "all checks passed"):
            assert expected in good, (expected, good)

        code, bad = check("bad", {"name": "centre2", "root": str(broken), "filter": {"CENTRE": 2}}, "--try-join",
                          ca_cert=str(tls.ca_cert), private_key=str(stranger))
        assert code == 2, bad
        assert "PROBLEM  data SA: 1 of 16 case(s) unusable" in bad and str(bad_file) in bad
        assert "PROBLEM  registration: the coordinator at " + address + " does not accept this site's key" in bad
        assert "2 problem(s):" in bad

        code, wrong = check("wrongca", {"name": "centre1", "root": str(tiny_data), "filter": {"CENTRE": 1}},
                            ca_cert=str(other_ca), private_key=str(tmp_path / "keys" / "missing"))
        assert code == 2, wrong
        assert f"PROBLEM  tls: the certificate of {address} is not vouched for by ca_cert {other_ca}" in wrong
        assert "PROBLEM  private_key: file not found" in wrong and "mkdir -p keys && ssh-keygen" in wrong
    code, nobody = check("nobody", {"name": "centre1", "root": str(tiny_data), "filter": {"CENTRE": 1}},
                         ca_cert=str(tls.ca_cert))
    assert code == 2 and f"PROBLEM  connection: nothing listens at {address}" in nobody
