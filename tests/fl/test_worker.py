"""The long-lived site worker behind the thin ClientApp, with real processes.

Without Flower: the socket and secret are owner-only, a request without this start's secret (or
from a worker of another start) is refused, what the worker receives is checked like the in-process
site, a worker left from an earlier start is stopped and not reused, a dead worker's task fails
with a clear error and the worker is restarted. With Flower (deployment on loopback): every
ClientApp process forwards to its site's worker and imports neither torch nor MONAI, and a worker
killed mid-round fails that round's task for its site only, named in the coordinator's log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedqc.core.errors import FedqcError
from fedqc.fl import processes
from fedqc.fl.launch import SiteWorkerProcess, SuperNode
from fedqc.fl.settings import ClientSettings
from fedqc.site import worker
from tests.fl.local import one_round_each, toy_sites, wait_until
from tests.fl.toy import ALGORITHM, make_toy_site

pytestmark = pytest.mark.slow


def _node_config(work_dir: Path, **extra) -> dict:
    return {"site-algorithm": ALGORITHM, "site-id": "site0", "seed": 1, "work-dir": str(work_dir), **extra}



def _impostor(tmp_path: Path, real: Path, secret: bytes) -> Path:
    """A folder whose socket is the real worker's and whose secret is ``secret``."""
    folder = tmp_path / "impostor"
    folder.mkdir(mode=0o700)
    (folder / worker.SOCKET).symlink_to(real / worker.SOCKET)
    (folder / worker.SECRET).write_text(secret.hex())
    return folder


def test_the_worker_is_owner_only_needs_this_starts_secret_and_checks_what_it_gets(tmp_path):
    work = tmp_path / "site0"
    proc = SiteWorkerProcess(work, _node_config(work)).start()
    try:
        folder = proc.folder
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_ISSOCK((folder / worker.SOCKET).stat().st_mode)
        assert stat.S_IMODE((folder / worker.SOCKET).stat().st_mode) == 0o600
        assert stat.S_IMODE((folder / worker.SECRET).stat().st_mode) == 0o600

        # The worker runs the same site code as the in-process path: same weights back, bit for bit.
        import torch

        remote = worker.RemoteSite(folder, 7, {}, {"lr": 0.1}, threads=1)  # one thread each: same sums
        local = make_toy_site(_node_config(work), {"lr": 0.1})
        init = remote.run("supervised", None, {"task": "supervised", "local-epochs": 0})
        config = {"task": "supervised", "local-epochs": 1, "server-round": 1, "phase-round": 1}
        got = remote.run("supervised", init.weights, config)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            want = local.run("supervised", init.weights, config)
        finally:
            torch.set_num_threads(threads)
        assert sorted(got.weights) == sorted(want.weights)
        assert all(np.array_equal(got.weights[n], want.weights[n]) for n in want.weights)
        assert all((got.weights[n].dtype, got.weights[n].shape) == (want.weights[n].dtype, want.weights[n].shape)
                   for n in want.weights)  # 0-d arrays stay 0-d
        assert got.metrics["num-examples"] == want.metrics["num-examples"]

        # Without the secret: refused, and the worker keeps serving its owner.
        with pytest.raises(worker.WorkerAuthError, match="another run"):
            worker.WorkerClient(_impostor(tmp_path, folder, os.urandom(32))).ping()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # a client that guesses
            raw.connect(str(folder / worker.SOCKET))
            hello = worker._recv_json(raw)
            assert hello["protocol"] == worker.PROTOCOL and len(bytes.fromhex(hello["nonce"])) == 32
            worker._send_frame(raw, bytes(64))
            assert worker._recv_json(raw) == {"error": "authentication failed: not this run's secret", "auth": True}
            assert raw.recv(1) == b""  # and the connection is closed
        assert "refused a request without this start's secret" in proc.log_path.read_text()
        assert worker.WorkerClient(folder).ping()["served"] == 2

        # What it receives is checked as in the site: a coordinator naming site code, a bad task, bad config.
        with pytest.raises(worker.WorkerError) as refused:
            worker.RemoteSite(folder, 8, {"site-factory": "evil:code"}, {}).run("supervised", None,
                                                                               {"task": "supervised"})
        assert refused.value.remote_type == "SiteCodeRefused"
        client = worker.WorkerClient(folder)
        with pytest.raises(worker.WorkerError, match="flat scalars"):
            client.call({"op": "run", "run_id": "7", "task": "supervised", "config": {"x": [1, 2]}})
        with pytest.raises(worker.WorkerError, match="is not a valid Task"):
            client.call({"op": "run", "run_id": "7", "task": "exfiltrate", "config": {}})
        assert proc.died() is None
    finally:
        proc.stop()
    assert not processes.alive(proc.proc.pid) and not (proc.folder / worker.SOCKET).exists()


def test_a_worker_left_by_an_earlier_start_is_stopped_not_reused(tmp_path):
    work = tmp_path / "site0"
    first = SiteWorkerProcess(work, _node_config(work)).start()
    old_secret = worker.read_secret(first.folder)
    second = SiteWorkerProcess(work, _node_config(work))
    try:
        second.start()
        assert not processes.alive(first.proc.pid)  # stopped by PID, never reused
        assert worker.read_secret(second.folder) != old_secret
        with pytest.raises(worker.WorkerAuthError):  # a ClientApp holding the old secret is refused
            worker.WorkerClient(_impostor(tmp_path, second.folder, old_secret)).ping()
        assert worker.WorkerClient(second.folder).ping()["pid"] == second.proc.pid
        # killed -9, it leaves its socket file: the next start replaces it
        os.kill(second.proc.pid, signal.SIGKILL)
        second.proc.wait(timeout=10)
        assert (second.folder / worker.SOCKET).exists()
        third = SiteWorkerProcess(work, _node_config(work)).start()
        assert worker.WorkerClient(third.folder).ping()["pid"] == third.proc.pid
        third.stop()
    finally:
        first.stop()
        second.stop()


def test_a_worker_whose_parent_dies_stops(tmp_path):
    work = tmp_path / "site0"
    parent = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from fedqc.fl.launch import SiteWorkerProcess;"
         f"w = SiteWorkerProcess(Path({str(work)!r}), {_node_config(work)!r}).start(); print(w.proc.pid)"],
        capture_output=True, text=True, timeout=300, check=True)  # exits without stopping its worker
    pid = int(parent.stdout.split()[-1])
    wait_until(lambda: not processes.alive(pid), 15, "the orphaned worker to stop")


def test_a_dead_worker_fails_its_task_clearly_and_is_restarted(tmp_path):
    work = tmp_path / "site0"
    proc = SiteWorkerProcess(work, _node_config(work, **{"delay-s": 300.0, "delay-task": "supervised"})).start()
    try:
        remote = worker.RemoteSite(proc.folder, 1, {}, {"lr": 0.1})
        init = remote.run("supervised", None, {"task": "supervised", "local-epochs": 0})
        failure: list[BaseException] = []
        config = {"task": "supervised", "local-epochs": 1}

        def task() -> None:
            try:
                remote.run("supervised", init.weights, config)
            except BaseException as exc:  # noqa: BLE001 (the test looks at it)
                failure.append(exc)

        thread = threading.Thread(target=task)
        thread.start()
        wait_until(lambda: (work / "busy").is_file(), 60, "the worker to start its task")
        old = proc.proc.pid
        os.kill(old, signal.SIGKILL)
        thread.join(timeout=30)
        assert not thread.is_alive()  # it failed at once, it did not hang
        assert len(failure) == 1 and isinstance(failure[0], worker.WorkerLost)
        assert "went away during the request" in str(failure[0])
        wait_until(lambda: proc.died() is not None, 10, "the worker to be reaped")
        (work / "delayed").write_text("killed")
        proc.restart()
        reply = remote.run("supervised", init.weights, config)  # the ClientApp's next message finds the new one
        assert proc.proc.pid != old and reply.metrics["num-examples"] > 0
    finally:
        proc.stop()


def test_a_worker_that_cannot_start_is_not_restarted_forever(tmp_path):
    work = tmp_path / "site0"
    proc = SiteWorkerProcess(work, _node_config(work, **{"site-algorithm": "no_such_module:make"}))
    with pytest.raises(processes.ProcessError, match="exited with code 1 while starting"):
        proc.start()
    proc.restart()
    wait_until(lambda: proc.died() is not None, 120, "the restarted worker to fail too")
    proc.restart()
    wait_until(lambda: proc.died() is not None, 120, "the restarted worker to fail too")
    with pytest.raises(FedqcError, match="exited within 20 s of each of its last 3 starts") as refused:
        proc.restart()
    assert "No module named 'no_such_module'" in str(refused.value)


# -- with Flower -----------------------------------------------------------------------------------

SERVER = """
import sys
from pathlib import Path
from fedqc.fl.launch import run_server
from fedqc.fl.settings import FederationSettings, ServerSettings
settings = ServerSettings(host="127.0.0.1", port=int(sys.argv[2]), federation=FederationSettings.from_json(sys.argv[3]))
sys.exit(run_server(None, Path(sys.argv[1]), True, settings=settings, resume=sys.argv[4] == "resume", max_seconds=600))
"""


def _server(tmp_path: Path, run_dir: Path, port: int, resume: bool) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"server-{'resume' if resume else 'first'}.log"
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(run_dir), str(port), str(tmp_path / "federation.json"),
                                 "resume" if resume else "new"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, out


def test_deployment_through_thin_clientapps_and_a_worker_killed_mid_round(tmp_path):
    """Site1's worker is killed -9 in supervised round 1: the round fails for site1 at once (named, with
    WorkerLost), fedqc-client's supervision restarts the worker, and the resumed run completes on it."""
    run_dir, port = tmp_path / "run", processes.free_port()
    one_round_each(min_sites=2, supervised_rounds=1, ae_rounds=0, refine_rounds=0,
                   round_timeout_s=300).to_json(tmp_path / "federation.json")
    sites = toy_sites(2)
    sites[1].update({"delay-s": 300.0, "delay-task": "supervised"})
    nodes = []
    for site in sites:
        site_id = str(site["site-id"])
        settings = ClientSettings(site_id=site_id, superlink=f"127.0.0.1:{port}", work_dir=tmp_path / "sites" / site_id,
                                  node_config={k: v for k, v in site.items() if k != "site-id"},
                                  port=processes.free_port(), max_retries=100, max_wait_s=600)
        nodes.append(SuperNode(settings, insecure=True).start())
    victim = tmp_path / "sites" / "site1"
    servers, restarted = [], []
    try:
        servers.append(_server(tmp_path, run_dir, port, resume=False))
        wait_until(lambda: (victim / "busy").is_file(), 300, "site1 to start its supervised work")
        (victim / "delayed").write_text("killed")  # the restarted worker works at normal speed
        killed_at = time.monotonic()
        os.kill(nodes[1].worker.proc.pid, signal.SIGKILL)
        wait_until(lambda: nodes[1].worker.died() is not None, 10, "the worker to be reaped")
        restarted.append(nodes[1].supervise_worker())  # what fedqc-client's loop does
        assert servers[0][0].wait(timeout=300) == 1  # min_sites 2: the round cannot be aggregated
        failed_after_s = time.monotonic() - killed_at
        first_out = servers[0][1].read_text()
        servers.append(_server(tmp_path, run_dir, port, resume=True))
        code = servers[1][0].wait(timeout=600)
        assert code == 0, servers[1][1].read_text()[-3000:]
    finally:
        for proc, _ in servers:
            processes.stop_tree(proc, grace_s=5)
        for node in nodes:
            node.stop()
    assert restarted[0].startswith("the site worker stopped (exit -9); restarted it")
    assert "site site1 failed: site site1: WorkerLost during supervised" in first_out
    assert failed_after_s < 120  # failed at once (Flower's polls), not at the 300 s round deadline
    rounds = json.loads((run_dir / "log.json").read_text())
    assert rounds[1]["phase"] == "supervised" and "error" in rounds[1] and "site1" in rounds[1]["error"]
    assert [r["phase"] for r in rounds if "error" not in r][-1] == "predict"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    for site in sites:
        work = tmp_path / "sites" / str(site["site-id"])
        client = json.loads((work / "worker" / worker.CLIENT_MODULES).read_text())
        assert client["heavy_modules"] == [], client  # the per-message ClientApp imported neither torch nor MONAI
        assert client["pid"] != os.getpid()
        assert (work / "predictions.npz").is_file()
    for node in nodes:
        assert not processes.alive(node.proc.pid) and not processes.alive(node.worker.proc.pid)
