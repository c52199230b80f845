"""The long-lived site worker: one process per hospital that holds its site for the whole run.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message. Without a worker, each
one imports torch and MONAI and rebuilds the site (its cases, models, the frozen QC module) from
the work dir. With one, ``fedqc-client`` starts this process beside its SuperNode
(:class:`fedqc.fl.launch.SiteWorker`); the per-message ClientApp only forwards the task's config
and arrays here (:class:`WorkerClient`) and the reply back, and imports neither torch nor MONAI.

Owned by the hospital and locked down:

* a Unix socket ``WORK/worker/worker.sock`` (mode 0600, folder 0700), peer checked to be the same
  user (``SO_PEERCRED``);
* a per-start secret ``WORK/worker/secret`` (32 random bytes, 0600) written by ``fedqc-client``;
  every connection is one request and is authenticated both ways by HMAC-SHA256 challenges
  (compared with :func:`hmac.compare_digest`): a process without the secret cannot drive the
  worker, and a worker left from another start (another secret) is refused by the ClientApp;
* the worker builds its site only from its own node config (``WORK/worker/node-config.json``,
  written by ``fedqc-client``) with the same :func:`fedqc.site.algorithm.site_factory` as the
  in-process path (a run config naming site code is refused), and runs the same
  :meth:`SiteAlgo.run` (which validates the task's config). The ClientApp still checks what may
  leave (``fl/site_runner._outgoing``) and the audit mod still records every reply.

Wire format: length-prefixed frames; a request is a JSON header naming its arrays (name, dtype,
shape; numeric dtypes only) then one frame per array, received straight into a numpy buffer
(no pickle, no extra copy). One site (one Flower run) is held at a time: a request of another run
rebuilds it. The worker exits when its parent (``fedqc-client``) is gone.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedqc.core.io import atomic_write, private_dir

DIR, SOCKET, SECRET, NODE_CONFIG, PID = "worker", "worker.sock", "secret", "node-config.json", "worker.pid"
CLIENT_MODULES = "last-client.json"  # heavy modules the last ClientApp process had imported
WORKER_KEY = "site-worker"  # node-config key: the worker folder; absent = run the site in-process
PROTOCOL = 1
HEAVY = ("torch", "monai")
_DTYPE_KINDS = "fiub"
_MAX_ARRAYS = 100_000
_MAX_HEADER = 64 * 1024 * 1024
_AUTH_TIMEOUT_S = 10.0
logger = logging.getLogger("fedqc.site.worker")


class WorkerError(RuntimeError):
    """The site worker could not be reached, refused the request, or failed it."""


class WorkerAuthError(WorkerError):
    """The worker and this process do not share this start's secret (e.g. a worker of another run)."""


class WorkerLost(WorkerError):
    """The worker went away while it had the request (it died or was stopped)."""


def worker_dir(work_dir: str | Path) -> Path:
    """``WORK/worker`` (created 0700)."""
    return private_dir(Path(work_dir) / DIR)


def new_secret(folder: Path) -> bytes:
    """A fresh secret for one start of the worker, written 0600 into ``folder``."""
    secret = secrets.token_bytes(32)
    atomic_write(Path(folder) / SECRET, secret.hex())
    return secret


def read_secret(folder: Path) -> bytes:
    return bytes.fromhex((Path(folder) / SECRET).read_text().strip())


# -- frames -----------------------------------------------------------------------------------------

def _send_frame(sock: socket.socket, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    sock.sendall(struct.pack("!Q", view.nbytes))
    if view.nbytes:
        sock.sendall(view)


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        got = sock.recv_into(view)
        if not got:
            raise EOFError("connection closed")
        view = view[got:]


def _recv_length(sock: socket.socket) -> int:
    head = bytearray(8)
    _recv_exact_into(sock, memoryview(head))
    return struct.unpack("!Q", head)[0]


def _recv_frame(sock: socket.socket, limit: int = _MAX_HEADER) -> bytes:
    size = _recv_length(sock)
    if size > limit:
        raise WorkerError(f"frame of {size} bytes exceeds {limit}")
    buf = bytearray(size)
    _recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def _send_json(sock: socket.socket, obj: Mapping) -> None:
    _send_frame(sock, json.dumps(obj).encode())


def _recv_json(sock: socket.socket) -> dict:
    obj = json.loads(_recv_frame(sock))
    if not isinstance(obj, dict):
        raise WorkerError("a frame that is not a JSON object")
    return obj


def send_message(sock: socket.socket, header: Mapping, arrays: Mapping[str, np.ndarray] | None) -> None:
    """A JSON header (with the arrays' names, dtypes and shapes) then each array's bytes."""
    arrays = {n: np.asarray(a, order="C") for n, a in (arrays or {}).items()}  # keeps 0-d arrays 0-d
    specs = [[n, a.dtype.str, list(a.shape)] for n, a in arrays.items()]
    _send_json(sock, {**header, "arrays": specs if arrays else None})
    for array in arrays.values():
        _send_frame(sock, array.reshape(-1).view(np.uint8))


def recv_message(sock: socket.socket) -> tuple[dict, dict[str, np.ndarray] | None]:
    """What :func:`send_message` sent; each array is received straight into its own buffer.

    Raises:
        WorkerError: a malformed header (names, dtypes, shapes) or an array of the wrong size.
    """
    header = _recv_json(sock)
    specs = header.pop("arrays", None)
    if specs is None:
        return header, None
    if not isinstance(specs, list) or len(specs) > _MAX_ARRAYS:
        raise WorkerError("arrays: not a list of [name, dtype, shape]")
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)
                and isinstance(spec[1], str) and isinstance(spec[2], list)
                and all(isinstance(d, int) and d >= 0 for d in spec[2])):
            raise WorkerError(f"arrays: bad entry {str(spec)[:80]}")
        name, dtype_text, shape = spec
        dtype = np.dtype(dtype_text)
        if dtype.kind not in _DTYPE_KINDS or name in arrays:
            raise WorkerError(f"array {name!r}: dtype {dtype_text} not numeric, or the name repeats")
        array = np.empty(shape, dtype=dtype)
        size = _recv_length(sock)
        if size != array.nbytes:
            raise WorkerError(f"array {name!r}: {size} bytes, its header says {array.nbytes}")
        _recv_exact_into(sock, memoryview(array.reshape(-1).view(np.uint8)))
        arrays[name] = array
    return header, arrays


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _connect_path(path: Path) -> tuple[str, int | None]:
    """A connectable name for ``path``: itself, or through its open folder when too long for AF_UNIX."""
    if len(os.fsencode(str(path))) < 100:
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


# -- the ClientApp's side ------------------------------------------------------------------------

class WorkerClient:
    """Talks to the site worker in ``folder`` with the secret found there.

    Args:
        folder: the worker folder (``WORK/worker``).
        connect_timeout_s: how long to wait for the socket (a worker being restarted).
    """

    def __init__(self, folder: str | Path, connect_timeout_s: float = 180.0):
        self.folder = Path(folder)
        self.connect_timeout_s = connect_timeout_s

    def _open(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout_s
        path = self.folder / SOCKET
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            name, fd = _connect_path(path)
            try:
                sock.connect(name)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise WorkerError(f"no site worker answers at {path} ({type(exc).__name__}): is fedqc-client "
                                      "running for this work dir?") from None
                time.sleep(0.2)
            finally:
                if fd is not None:
                    os.close(fd)

    def call(self, header: Mapping, arrays: Mapping[str, np.ndarray] | None = None,
             timeout_s: float | None = None) -> tuple[dict, dict[str, np.ndarray] | None]:
        """One authenticated request; the worker's reply header and arrays.

        Raises:
            WorkerAuthError: the worker does not hold this start's secret (or this process lacks it).
            WorkerLost: the connection broke while the worker had the request.
            WorkerError: the worker refused or failed the request (its message says why).
        """
        try:
            secret = read_secret(self.folder)
        except (OSError, ValueError) as exc:
            raise WorkerAuthError(f"cannot read the worker's secret in {self.folder}: {exc}") from None
        sock = self._open()
        try:
            sock.settimeout(_AUTH_TIMEOUT_S)
            hello = _recv_json(sock)
            if hello.get("protocol") != PROTOCOL:
                raise WorkerError(f"the site worker speaks protocol {hello.get('protocol')}, this ClientApp {PROTOCOL}")
            mine = secrets.token_bytes(32)
            _send_frame(sock, _mac(secret, b"client:", bytes.fromhex(hello["nonce"])) + mine)
            answer = _recv_frame(sock, 1024)
            if not hmac.compare_digest(answer, _mac(secret, b"worker:", mine)):
                raise WorkerAuthError(f"the site worker at {self.folder / SOCKET} (pid {hello.get('pid')}) does not "
                                      "hold this run's secret: a worker of another run, not used")
            sock.settimeout(timeout_s)
            send_message(sock, header, arrays)
            reply, out = recv_message(sock)
        except (EOFError, ConnectionResetError, BrokenPipeError) as exc:
            raise WorkerLost(f"the site worker went away during the request ({type(exc).__name__}); fedqc-client "
                             "restarts it") from None
        finally:
            sock.close()
        if "error" in reply:
            if reply.get("auth"):
                raise WorkerAuthError(reply["error"])
            error = WorkerError(reply["error"])
            error.remote_type = str(reply.get("type") or "WorkerError")  # what the site raised
            raise error
        return reply, out

    def ping(self) -> dict:
        return self.call({"op": "ping"})[0]


class RemoteSite:
    """A :class:`~fedqc.site.contract.SiteAlgo` whose ``run`` happens in the site worker.

    Args:
        folder: the worker folder.
        run_id: the Flower run (the worker rebuilds its site for another run).
        run_config: the run's config (the worker's ``site_factory`` refuses one naming site code).
        site_run_config: what the site factory receives as its run config.
        threads: torch threads for the worker (0: torch's default).
    """

    def __init__(self, folder: str | Path, run_id: int | str, run_config: Mapping, site_run_config: Mapping,
                 threads: int = 0):
        self.client = WorkerClient(folder)
        self.header = {"op": "run", "run_id": str(run_id), "run_config": dict(run_config),
                       "site_run_config": dict(site_run_config), "threads": int(threads)}

    def run(self, task, weights: Mapping[str, np.ndarray] | None, config: Mapping):
        from fedqc.site.contract import SiteReply, Task

        heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
        header = {**self.header, "task": Task(task).value, "config": dict(config), "client_modules": heavy,
                  "client_pid": os.getpid()}
        reply, out = self.client.call(header, weights)
        return SiteReply(weights=out, metrics=reply.get("metrics") or {})


# -- the worker ------------------------------------------------------------------------------------

def _same_user(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


class SiteWorker:
    """The worker process's state: its node config, secret and the site of the current run."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.node_config: dict = json.loads((self.folder / NODE_CONFIG).read_text())
        self.secret = read_secret(self.folder)
        self.algo = None
        self.run_id: str | None = None
        self.threads_set = False
        self.served = 0

    def warm_up(self) -> None:
        """Import the site's algorithm (torch, MONAI) now, not at the first message."""
        from fedqc.site.algorithm import site_factory

        site_factory(self.node_config, {})

    def site(self, header: Mapping):
        from fedqc.site.algorithm import site_factory

        threads = int(header.get("threads", 0) or 0)
        if threads and not self.threads_set:
            import torch

            torch.set_num_threads(threads)
            self.threads_set = True
        run_id = str(header.get("run_id", ""))
        if self.algo is None or run_id != self.run_id:
            run_config = header.get("run_config") or {}
            site_run_config = header.get("site_run_config") or {}
            if not isinstance(run_config, dict) or not isinstance(site_run_config, dict):
                raise WorkerError("run_config and site_run_config must be objects")
            self.algo = None  # never keep another run's site
            factory = site_factory(self.node_config, run_config)  # refuses a coordinator naming site code
            self.algo = factory(self.node_config, site_run_config)
            self.run_id = run_id
            logger.info("run %s: site %s built", run_id, self.node_config.get("site-id"))
        return self.algo

    def handle(self, header: dict, arrays: dict | None) -> tuple[dict, dict | None]:
        from fedqc.site.contract import Task

        op = header.get("op")
        if op == "ping":
            return {"pid": os.getpid(), "protocol": PROTOCOL, "run_id": self.run_id, "served": self.served,
                    "cuda": _cuda_state()}, None
        if op != "run":
            raise WorkerError(f"unknown op {op!r}")
        config = header.get("config")
        if not isinstance(config, dict) or not all(isinstance(v, (bool, int, float, str)) for v in config.values()):
            raise WorkerError("config must be an object of flat scalars")
        modules = header.get("client_modules")
        if isinstance(modules, list):
            atomic_write(self.folder / CLIENT_MODULES, json.dumps({"pid": header.get("client_pid"),
                                                                   "heavy_modules": modules[:50]}))
            if modules:
                logger.warning("the ClientApp process imported %s: each message pays for it", modules[:5])
        task = Task(str(header.get("task", "")))
        algo = self.site(header)
        logger.info("run %s: %s, phase round %s (exchange %s)", self.run_id, task.value, config.get("phase-round", "?"),
                    config.get("server-round", "?"))
        reply = algo.run(task, arrays, config)
        self.served += 1
        return {"metrics": dict(reply.metrics)}, reply.weights

    def serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(_AUTH_TIMEOUT_S)
        if not _same_user(conn):
            logger.warning("refused a connection from another user")
            return
        nonce = secrets.token_bytes(32)
        _send_json(conn, {"protocol": PROTOCOL, "nonce": nonce.hex(), "pid": os.getpid()})
        auth = _recv_frame(conn, 1024)
        if len(auth) != 64 or not hmac.compare_digest(auth[:32], _mac(self.secret, b"client:", nonce)):
            logger.warning("refused a request without this start's secret")
            _send_json(conn, {"error": "authentication failed: not this run's secret", "auth": True})
            return
        _send_frame(conn, _mac(self.secret, b"worker:", auth[32:]))
        conn.settimeout(None)
        try:
            header, arrays = recv_message(conn)
            reply, out = self.handle(header, arrays)
        except Exception as exc:  # the ClientApp turns it into an Error naming the type only
            logger.exception("request failed")
            reply, out = {"error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__}, None
        send_message(conn, reply, out)


def _cuda_state() -> dict:
    """Whether this process holds a CUDA context, and the memory torch has allocated on it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {"initialized": False}
    return {"initialized": True, "allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1)}


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            logger.info("fedqc-client (pid %s) is gone: the site worker stops", parent)
            os._exit(0)
        time.sleep(0.5)


def serve(folder: Path) -> int:
    """Listen on ``folder/worker.sock`` until killed (or the parent is gone); one request at a time."""
    folder = Path(folder).resolve()
    worker = SiteWorker(folder)
    worker.warm_up()
    os.chdir(folder)  # bind by a short relative name: AF_UNIX paths are capped near 108 bytes
    Path(SOCKET).unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(SOCKET)
    finally:
        os.umask(old)
    os.chmod(SOCKET, 0o600)
    listener.listen(8)
    atomic_write(folder / PID, str(os.getpid()))
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    logger.info("site worker %s ready on %s (pid %s)", worker.node_config.get("site-id"), folder / SOCKET, os.getpid())
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                worker.serve_one(conn)
            except (OSError, EOFError, WorkerError, ValueError) as exc:
                logger.warning("connection dropped: %s", exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedqc.site.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="the worker folder (WORK/worker)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.dir)


if __name__ == "__main__":
    raise SystemExit(main())
