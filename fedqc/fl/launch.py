"""Real SuperLink / SuperNode processes and the ``flwr`` CLI: what fedqc-server and fedqc-client run.

* :class:`SuperLink`: ``flower-superlink`` with Flower's home in ``RUN/.flwr`` (its database,
  the ``flwr`` connection ``config.toml``), runtime dependency installation, telemetry and update
  checks off; TLS from :class:`~fedqc.fl.settings.TlsFiles` unless ``insecure``; SuperNode
  authentication when site keys are given. :meth:`SuperLink.submit` runs ``flwr run APP fedqc
  --stream`` and reads the run's final status with ``flwr ls`` (``flwr run`` exits 0 even when the
  ServerApp fails).
* :class:`SuperNode`: ``flower-supernode`` for one site, node config from a TOML file in the
  site's work dir, Flower home ``WORK/.flwr``.
* :func:`run_server` / :func:`run_client`: the two commands, returning an exit code. The server
  locks its run directory (:class:`RunLock`), shows Flower's progress without tracebacks
  (:class:`TerminalFilter`; the log keeps everything) and ends with one line saying what happened
  and what to do (:func:`outcome_line`). The client follows its SuperNode's log and says on the
  terminal when it joins, loses or regains the coordinator, and why it stopped
  (:func:`explain_supernode_exit`); the first connection has a deadline.

Every process is stopped by PID with its descendants (:mod:`fedqc.fl.processes`), also when the
commands get SIGTERM or SIGHUP (:func:`fedqc.fl.processes.stop_on_signals`, installed by the CLI).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Self

from fedqc.core.errors import ConfigError, FedqcError
from fedqc.fl import appdir, processes, run_state
from fedqc.fl.settings import ClientSettings, ServerSettings

CONNECTION = "fedqc"
LOCK = ".lock"  # RUN/.lock: held by the coordinator using the run directory
QUIET_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
             "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
ALREADY_REGISTERED = "[code: 23]"  # flwr supernode register: "Public key already in use"
INSECURE_WARNING = "WARNING: --insecure: no TLS, traffic is readable on the network; use on loopback for tests only"
Echo = Callable[[str], None]
logger = logging.getLogger("fedqc.fl.launch")


def executable(name: str) -> str:
    """A Flower command from this Python's environment (else from PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FedqcError(f"'{name}' not found: install flwr 1.42 in this environment")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """The environment of Flower processes: private home, no runtime installs, no telemetry.

    This Python's bin folder leads PATH: Flower's daemons start ``flower-superexec``,
    ``flwr-serverapp`` and ``flwr-clientapp`` by name.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home), "PATH": path}


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """``text`` without terminal colour codes (Flower colours its log levels)."""
    return ANSI.sub("", text)


class TerminalFilter:
    """Which lines of ``flwr run --stream`` reach the terminal: all but tracebacks and Flower's exit-code
    blurbs (the log file keeps every line). The federation's outcome is then said in one line
    (:func:`outcome_line`)."""

    _BLURB = ("ServerApp raised an exception", "An unhandled exception occurred", "For more information, visit:")

    def __init__(self) -> None:
        self._state = "normal"  # "traceback": inside one; "after": its exception line was seen
        self._after_exit_code = False

    def __call__(self, line: str) -> bool:
        text = plain(line).rstrip("\n")
        if text.startswith("Traceback (most recent call last):"):
            self._state = "traceback"
            return False
        if self._state == "traceback":
            if not text.strip() or text[0].isspace():
                return False
            self._state = "after"  # the exception line: the outcome line says it once
            return False
        if self._state == "after":
            if not text.strip() or text[0].isspace() or text.startswith(("During handling", "The above exception")):
                return False  # a multi-line message, or the link to a chained traceback
            self._state = "normal"
        if re.search(r"Exit Code: \d+", text):
            self._after_exit_code = True
            return False
        if any(marker in text for marker in self._BLURB):
            return False
        if self._after_exit_code and not text.strip():
            return False
        self._after_exit_code = False
        return True


class _Daemon:
    """A Flower daemon we started: a context manager that stops it and its children by PID."""

    proc: subprocess.Popen | None
    stopped_pids: list[int]
    seen_children: list[int]

    def start(self) -> Self:
        raise NotImplementedError

    def remember_children(self) -> None:
        """Note the daemon's descendants now, so that they are stopped even if the daemon dies first."""
        if self.proc is not None and self.proc.poll() is None:
            seen = getattr(self, "seen_children", [])
            self.seen_children = seen + [p for p in processes.descendants(self.proc.pid) if p not in seen]

    def stop(self) -> None:
        """Stop the daemon and its children (e.g. its flower-superexec) by PID."""
        if self.proc is not None:
            self.stopped_pids = processes.stop_tree(self.proc, known=getattr(self, "seen_children", []))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SuperLink(_Daemon):
    """The coordinator's SuperLink for one run directory (a context manager that stops it).

    Args:
        run_dir: the run directory (Flower home ``RUN/.flwr``, logs in ``RUN/logs``).
        settings: host, port, TLS files, allow-listed site keys.
        insecure: run without TLS (refused together with site authentication).
    """

    def __init__(self, run_dir: Path, settings: ServerSettings, insecure: bool):
        self.run_dir = Path(run_dir).resolve()
        self.settings = settings
        self.insecure = insecure
        self.home = run_state.private_dir(self.run_dir / ".flwr")
        self.log_path = self.run_dir / "logs" / "superlink.log"
        self.proc: subprocess.Popen | None = None
        self.stopped_pids: list[int] = []  # the SuperLink and its descendants, when stopped
        self.cli_pids: list[int] = []  # `flwr run` processes
        if not insecure and (settings.tls is None or not settings.tls.server_cert or not settings.tls.server_key):
            raise ConfigError("server.tls", "TLS needs ca_cert, server_cert and server_key (or run with --insecure)")
        if insecure and settings.site_public_keys:
            raise ConfigError("server.site_public_keys", "SuperNode authentication needs TLS; drop --insecure")

    @property
    def address(self) -> str:
        """``host:port`` for clients (``127.0.0.1`` when bound to all interfaces)."""
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"{host}:{self.settings.port}"

    def command(self) -> list[str]:
        """The ``flower-superlink`` command line."""
        s = self.settings
        cmd = [executable("flower-superlink"), "--host", s.host, "--port", str(s.port),
               "--database", str(self.home / "state.db"), "--disable-runtime-dependency-installation"]
        if self.insecure:
            return cmd + ["--insecure"]
        cmd += ["--ssl-ca-certfile", str(s.tls.ca_cert), "--ssl-certfile", str(s.tls.server_cert),
                "--ssl-keyfile", str(s.tls.server_key)]
        return cmd + (["--enable-supernode-auth"] if s.site_public_keys else [])

    def start(self) -> Self:
        """Start the SuperLink, write the ``flwr`` connection, allow-list site keys."""
        if not processes.port_is_free(self.settings.host, self.settings.port):
            raise FedqcError(f"port {self.settings.port} on {self.settings.host} is already in use; "
                             "stop what uses it or choose another server port")
        self._write_connection()
        self.proc = processes.spawn(self.command(), flower_env(self.home), self.log_path, cwd=self.run_dir)
        try:
            processes.wait_for_port(self.address.split(":")[0], self.settings.port, self.settings.startup_timeout_s,
                                    self.proc, self.log_path)
            self._register_site_keys()
        except processes.ProcessError as exc:
            self.stop()
            lines = [plain(x).strip() for x in str(exc).splitlines() if x.strip()]
            errors = [x for x in lines[1:] if re.search(r"error|Error|ERROR|denied|No such file", x)]
            raise FedqcError(f"the SuperLink did not start: {lines[0]}"
                             + (f" ({errors[-1]})" if errors else "")
                             + f"; check host, port and the tls files in server.yaml; its log: {self.log_path}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def _register_site_keys(self) -> None:
        """Allow-list every site key. A key this SuperLink's database already holds (a resumed run: same
        ``RUN/.flwr/state.db``) is answered with Flower's code 23, "Public key already in use": it is
        registered, and its site keeps its SuperNode identity, so that answer is accepted."""
        for key in self.settings.site_public_keys:
            path = Path(key).resolve()
            result = self.flwr(["supernode", "register", str(path), CONNECTION])
            if result.returncode == 0:
                continue
            text = result.stdout + result.stderr
            if ALREADY_REGISTERED in text:
                continue
            problem = next((line.strip(" │╭╮╰╯─") for line in text.splitlines() if "[code:" in line), text[-300:])
            raise FedqcError(f"the SuperLink refused the site key {path}: {problem.strip()}; keys must be "
                             "OpenSSH ECDSA public keys (ssh-keygen -t ecdsa -b 384), see server/README.md")

    def _write_connection(self) -> None:
        lines = [f"[superlink.{CONNECTION}]", f'address = "{self.address}"']
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {appdir.toml_value(str(Path(self.settings.tls.ca_cert).resolve()))}")
        run_state.atomic_write(self.home / "config.toml", ("\n".join(lines) + "\n").encode())

    def flwr(self, args: list[str], check: bool = False, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` against this SuperLink."""
        result = subprocess.run([executable("flwr"), *args], env=flower_env(self.home), capture_output=True,
                                text=True, timeout=timeout_s, cwd=self.run_dir, check=False)
        if check and result.returncode != 0:
            raise FedqcError(f"flwr {args[0]} failed ({result.returncode}): {result.stdout[-500:]}{result.stderr[-500:]}")
        return result

    def submit(self, app_dir: Path, echo: Echo = print, max_seconds: float | None = None) -> str:
        """Run the app with ``flwr run --stream`` until it ends; returns the run id.

        Raises:
            FedqcError: the run could not be started, or ran past ``max_seconds`` (it is stopped).
        """
        log_path = self.run_dir / "logs" / "flwr-run.log"
        proc = subprocess.Popen([executable("flwr"), "run", str(app_dir), CONNECTION, "--stream"],
                                env=flower_env(self.home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=self.run_dir, start_new_session=True)
        self.cli_pids.append(proc.pid)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True)
        reader.start()
        run_id, started, shown, seen_at = "", time.monotonic(), TerminalFilter(), 0.0
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with os.fdopen(fd, "a") as log_file:
                while True:
                    try:
                        line = lines.get(timeout=1.0)
                    except queue.Empty:
                        line = ""
                    if line is None:
                        break
                    if line:
                        log_file.write(plain(line))  # no colour codes in the file
                        log_file.flush()
                        if shown(line):
                            echo(line.rstrip("\n"))
                        run_id = run_id or next(iter(re.findall(r"started run (\d+)", line)), "")
                    if max_seconds and time.monotonic() - started > max_seconds:
                        raise FedqcError(f"the run took longer than {max_seconds:.0f} s; stopped")
                    if time.monotonic() - seen_at > 3:
                        self.remember_children()
                        seen_at = time.monotonic()
                    if self.proc is not None and self.proc.poll() is not None:
                        raise FedqcError(f"the SuperLink exited ({self.proc.returncode}); see {self.log_path}")
        except BaseException:
            if run_id:
                self.flwr(["stop", run_id, CONNECTION], timeout_s=30)
            raise
        finally:
            processes.stop_tree(proc, grace_s=5)
            reader.join(timeout=5)
        if not run_id:
            raise FedqcError(f"flwr run did not start a run; see {log_path}")
        return run_id

    def status(self, run_id: str) -> dict:
        """The run's entry from ``flwr ls --run-id ID --format json`` (status, traffic, times)."""
        import json

        result = self.flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], check=True)
        runs = json.loads(result.stdout[result.stdout.index("{"):]).get("runs", [])
        return runs[0] if runs else {"status": "unknown"}



QUICK_DEATH_S, QUICK_DEATHS = 20.0, 3  # a site worker that dies this fast this often is not restarted again


class SiteWorkerProcess:
    """The site worker (:mod:`fedqc.site.worker`) beside a SuperNode: started, supervised, stopped by PID.

    Each :meth:`start` writes a fresh secret (0600) and the site's node config into ``WORK/worker``
    (0700); a :meth:`restart` after the worker died keeps the secret. A live worker found on the
    work dir that is not ours (left by an earlier start whose SuperNode died, or whose fedqc-client
    was killed -9 and the worker not yet gone) is stopped by PID, never reused: it holds another
    secret and another run's site. One fedqc-client per work dir.
    """

    def __init__(self, work_dir: Path, node_config: dict):
        from fedqc.site import worker  # Flower-free, no torch

        self.work_dir = Path(work_dir)
        self.folder = worker.worker_dir(self.work_dir)
        self.node_config = dict(node_config)
        self.log_path = self.work_dir / "logs" / "worker.log"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.quick_deaths = 0  # deaths in a row within QUICK_DEATH_S of a start

    def _leftover(self) -> int | None:
        """The PID of a live site worker on this work dir that we did not start."""
        from fedqc.site import worker

        try:
            pid = int((self.folder / worker.PID).read_text().strip())
        except (OSError, ValueError):
            return None
        if self.proc is not None and pid == self.proc.pid:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        ours = b"fedqc.site.worker" in cmdline and os.fsencode(str(self.folder)) in cmdline  # never another's PID
        return pid if ours and processes.alive(pid) else None

    def start(self, ready_timeout_s: float | None = 180.0, new_secret: bool = True) -> Self:
        """Start the worker and (unless ``ready_timeout_s`` is None) wait until it answers an authenticated ping.

        Not waiting lets the SuperNode start while the worker imports torch: a ClientApp waits for
        the socket (:class:`fedqc.site.worker.WorkerClient`).

        Raises:
            ProcessError: the worker exited or stayed silent (its log's end is quoted).
        """
        from fedqc.site import worker

        pid = self._leftover()
        if pid is not None:  # another start's worker: it holds another secret and another run's site
            logger.warning("stopping the site worker left on %s by an earlier start (pid %s)", self.work_dir, pid)
            processes.stop_tree(pid, grace_s=5.0)
        for name in (worker.SOCKET, worker.PID):
            (self.folder / name).unlink(missing_ok=True)
        if new_secret:
            worker.new_secret(self.folder)
        run_state.atomic_write(self.folder / worker.NODE_CONFIG, json.dumps(self.node_config).encode())
        cmd = [sys.executable, "-m", "fedqc.site.worker", "--dir", str(self.folder)]
        self.proc = processes.spawn(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, self.log_path, cwd=self.folder)
        self.started_at = time.monotonic()
        return self if ready_timeout_s is None else self.wait_ready(ready_timeout_s)

    def wait_ready(self, ready_timeout_s: float = 180.0) -> Self:
        """Wait until the worker answers an authenticated ping (ProcessError when it exits or stays silent)."""
        from fedqc.site import worker

        client = worker.WorkerClient(self.folder, connect_timeout_s=1.0)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise processes.ProcessError(f"the site worker exited with code {self.proc.returncode} while "
                                             f"starting\n{processes.log_tail(self.log_path)}")
            try:
                client.ping()
                return self
            except worker.WorkerError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise processes.ProcessError(f"the site worker did not answer within {ready_timeout_s:.0f} s\n"
                                                 f"{processes.log_tail(self.log_path)}") from None
            time.sleep(0.3)

    def died(self) -> int | None:
        """The exit code when the worker stopped by itself (None while it runs)."""
        return None if self.proc is None else self.proc.poll()

    def restart(self) -> Self:
        """Start it again with the same secret (the SuperNode's ClientApps keep finding it).

        Raises:
            FedqcError: it died within :data:`QUICK_DEATH_S` of each of its last :data:`QUICK_DEATHS`
                starts (it cannot start: its log's end is quoted), instead of restarting forever.
        """
        quick = time.monotonic() - self.started_at < QUICK_DEATH_S
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        if self.quick_deaths >= QUICK_DEATHS:
            self.stop()
            raise FedqcError(f"the site worker exited within {QUICK_DEATH_S:.0f} s of each of its last {QUICK_DEATHS} "
                             f"starts; its log ({self.log_path}) ends:\n{processes.log_tail(self.log_path, 8)}")
        self.stop()
        self.restarts += 1
        return self.start(ready_timeout_s=None, new_secret=False)

    def stop(self) -> None:
        from fedqc.site import worker

        if self.proc is not None:
            processes.stop_tree(self.proc, grace_s=5.0)
        (self.folder / worker.SOCKET).unlink(missing_ok=True)


class SuperNode(_Daemon):
    """One site's SuperNode (a context manager that stops it).

    Args:
        settings: the site's connection, keys and node config.
        insecure: connect without TLS.
    """

    def __init__(self, settings: ClientSettings, insecure: bool, worker: bool = True):
        if not insecure and settings.root_certificates is None:
            raise ConfigError("client.root_certificates", "the consortium CA certificate is needed (or --insecure)")
        self.settings = settings
        self.insecure = insecure
        self.worker: SiteWorkerProcess | None = None
        self.use_worker = worker
        self.work_dir = run_state.private_dir(Path(settings.work_dir).expanduser().resolve())
        self.log_path = self.work_dir / "logs" / "supernode.log"
        self.proc: subprocess.Popen | None = None
        self.stopped_pids: list[int] = []

    def command(self) -> list[str]:
        """The ``flower-supernode`` command line (writes the node-config TOML it names)."""
        s = self.settings
        node_config = self.work_dir / "node-config.toml"
        lines = [f'"{k}" = {appdir.toml_value(v)}' for k, v in s.full_node_config().items()]
        run_state.atomic_write(node_config, ("\n".join(lines) + "\n").encode())
        cmd = [executable("flower-supernode"), "--superlink", s.superlink, "--node-config", str(node_config),
               "--port", str(s.port)]
        cmd += ["--insecure"] if self.insecure else ["--root-certificates", str(s.root_certificates)]
        if s.private_key is not None:
            cmd += ["--auth-supernode-private-key", str(s.private_key)]
        if s.max_retries is not None:
            cmd += ["--max-retries", str(s.max_retries)]
        if s.max_wait_s is not None:
            cmd += ["--max-wait-time", str(s.max_wait_s)]
        return cmd

    def spawn(self) -> subprocess.Popen:
        """Start the SuperNode process without waiting for it."""
        if not processes.port_is_free("127.0.0.1", self.settings.port):
            raise FedqcError(f"port {self.settings.port} is already in use; give this site another client port")
        home = run_state.private_dir(self.work_dir / ".flwr")
        if self.use_worker and self.worker is None:
            from fedqc.site.worker import WORKER_KEY

            self.worker = SiteWorkerProcess(self.work_dir, self.settings.full_node_config()).start(ready_timeout_s=None)
            node_config = {**self.settings.node_config, WORKER_KEY: str(self.worker.folder)}
            self.settings = ClientSettings(**{**self.settings.__dict__, "node_config": node_config})
        try:
            self.proc = processes.spawn(self.command(), flower_env(home), self.log_path, cwd=self.work_dir)
        except BaseException:
            self.stop()
            raise
        return self.proc

    def supervise_worker(self) -> str | None:
        """Restart the site worker when it died; what happened, in one line (None: all is well)."""
        if self.worker is None or self.worker.died() is None:
            return None
        code = self.worker.died()
        self.worker.restart()
        return (f"the site worker stopped (exit {code}); restarted it (restart {self.worker.restarts}); the task "
                "it had failed at this site")

    def stop(self) -> None:
        """Stop the SuperNode (and its children) and the site worker, by PID."""
        super().stop()
        if self.worker is not None:
            self.worker.stop()
            self.stopped_pids = [*getattr(self, "stopped_pids", []), self.worker.proc.pid]

    def start(self, ready_timeout_s: float = 60.0) -> Self:
        """Start the SuperNode and wait for its local ClientApp port."""
        self.spawn()
        try:
            processes.wait_for_port("127.0.0.1", self.settings.port, ready_timeout_s, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self



class RunLock:
    """An exclusive lock on a run directory (``RUN/.lock``, ``fcntl.flock``) held while a coordinator uses it.

    Taken before anything else in the folder is written; a second coordinator on the same folder is
    refused with the PID that holds it. The lock goes with the process (also on ``kill -9``), so a
    crashed coordinator never leaves a stale one. Re-entrant within one process.
    """

    _held: ClassVar[dict[Path, list]] = {}  # run dir -> [fd, depth]

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / LOCK

    def __enter__(self) -> Self:
        import fcntl

        held = RunLock._held.get(self.run_dir)
        if held is not None:
            held[1] += 1
            return self
        run_state.private_dir(self.run_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FedqcError(f"{self.run_dir} is in use by another fedqc-server (PID {holder}, lock {self.path}); "
                             "stop that one first, or give this run another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        RunLock._held[self.run_dir] = [fd, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        held = RunLock._held[self.run_dir]
        held[1] -= 1
        if held[1] == 0:
            del RunLock._held[self.run_dir]
            os.close(held[0])  # releases the flock; the file stays (an empty lock file is harmless)


def resume_hint(config_path: str | Path | None, run_dir: Path) -> str:
    """The command that continues this run (that starts it again when no round was saved yet)."""
    config = f"--config {config_path} " if config_path is not None else ""
    if not (Path(run_dir) / run_state.STATE).is_file():
        return f"fedqc-server {config}--run-dir {run_dir} (no round was saved: it starts from the beginning)"
    return f"fedqc-server {config}--run-dir {run_dir} --resume"


def outcome_line(status: dict, run_dir: Path, config_path: str | Path | None = None) -> str:
    """What happened to a Flower run, in one line, with what to do when it did not complete."""
    state = str(status.get("status", "unknown"))
    if state == "finished:completed":
        summary_path = run_dir / run_state.SUMMARY
        summary = run_state.read_json(summary_path) if summary_path.is_file() else {}
        took = f" in {summary['seconds']:.0f} s" if "seconds" in summary else ""
        return (f"federation completed: {summary.get('exchanges', '?')} exchanges{took}; "
                f"results in {run_dir} (summary.json, log.json, checkpoints/)")
    log_path = run_dir / "logs" / "flwr-run.log"
    if state == "finished:stopped":
        return f"federation stopped before it completed; continue with: {resume_hint(config_path, run_dir)}"
    details = str(status.get("status-details") or "")
    reason = re.sub(r"^ServerApp failed with exception:\s*", "", details) if details not in ("", "N/A") else ""
    if not reason:
        reason = f"the run ended as '{state}' with no reason given"
    resume = resume_hint(config_path, run_dir)
    if "required sites connected within" in reason:
        advice = (f"start the missing sites' fedqc-client (or lower federation.min_sites or "
                  f"federation.start_sites, raise federation.timeout_s), then {resume}")
    elif any(m in reason for m in ("sites answered", "no usable update", "no site returned")):
        advice = (f"each failed site's reason is in its own log (the site's fedqc-client says it; the "
                  f"coordinator only learns the exception type); fix the sites, then {resume}")
    elif "ServerApp failed" in details:
        advice = f"an error in the coordinator's own code; send {log_path} to the fedqc maintainers"
    else:
        advice = f"read {log_path}, then {resume}"
    return f"federation failed: {reason.rstrip('.')}. What to do: {advice} (traceback and Flower log: {log_path})"


def run_server(config_path: str | Path | None, run_dir: str | Path, insecure: bool, *, settings: ServerSettings,
               resume: bool = False, echo: Echo = print, max_seconds: float | None = None) -> int:
    """fedqc-server: start a SuperLink, run the protocol as a Flower run, stop; 0 when it completed.

    The run directory is locked (:class:`RunLock`) before anything in it is written.

    Args:
        config_path: the server YAML (copied into the run directory for the record), or None.
        run_dir: the run directory (created; with ``resume``, an interrupted run's directory).
        insecure: no TLS (says so loudly).
        settings: where to listen, TLS, site keys, the protocol.
        resume: continue from ``RUN/state.json``.
        echo: where progress lines go.
        max_seconds: stop the run after this long (None: no limit).

    Returns:
        0 completed, 1 failed (the reason and what to do said in one line), 128 + signal when
        interrupted (Ctrl-C, SIGTERM, SIGHUP: the run and every process it started are stopped).
    """
    run_dir = Path(run_dir).resolve()
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    with RunLock(run_dir):
        if resume and not (run_dir / run_state.STATE).is_file():
            raise FedqcError(f"{run_dir}: nothing to resume (no {run_state.STATE}); start it without --resume")
        if config_path is not None:
            run_state.atomic_write(run_dir / "server.yaml", Path(config_path).read_bytes())
        settings.federation.to_json(run_dir / "federation.json")
        app = appdir.write_app(run_dir, appdir.run_config(settings.federation, run_dir, resume=resume))
        try:
            with SuperLink(run_dir, settings, insecure) as link:
                run_id = link.submit(app, echo=echo, max_seconds=max_seconds)
                status = link.status(run_id)
        except KeyboardInterrupt as exc:
            why = f"stopped by {exc.args[0]}" if isinstance(exc, processes.Terminated) else "interrupted"
            echo(f"{why}: the run, the SuperLink and its processes were stopped; continue with: "
                 f"{resume_hint(config_path, run_dir)}")
            return getattr(exc, "exit_code", 130)
        run_state.write_json(run_dir / "flower-run.json", status)
        echo(outcome_line(status, run_dir, config_path))
        return 0 if status.get("status") == "finished:completed" else 1


# What a SuperNode's log says when it could not join or went down, and what to tell the site.
def explain_supernode_exit(log_text: str, settings: ClientSettings, insecure: bool, code: int | None,
                           log_path: Path, lost_connection: bool = False) -> str:
    """One line for the site's operator: why the SuperNode stopped and what to do.

    ``lost_connection``: it had joined, lost the coordinator, and stopped while reconnecting: what a
    SuperNode does when the coordinator comes back with a new federation (its heartbeat is refused,
    HTTP 401, sometimes without a word in the log).
    """
    text = plain(log_text)
    where = f"the coordinator at {settings.superlink}"
    key = settings.private_key
    verify = re.search(r"certificate verify failed: ([^\n(]+)", text)
    if verify or "CERTIFICATE_VERIFY_FAILED" in text:
        detail = verify.group(1).strip() if verify else "certificate verify failed"
        if "mismatch" in detail:
            return (f"{where} presented a certificate that does not name this host ({detail}): use the host "
                    "name the coordinator's certificate holds in superlink, or ask the coordinator for a "
                    "certificate that names it (python -m fedqc.fl.certs ... --host HOST)")
        return (f"{where} presented a certificate that your CA certificate does not vouch for ({detail}); "
                f"ca_cert is {settings.root_certificates}: get the consortium's current ca.crt from the "
                "coordinator, set ca_cert to it, and start again")
    if "[code: 2004]" in text:
        return (f"{where} does not accept this site's key {key} (code 2004: not registered): send "
                f"{key}.pub to the coordinator to be listed under site_keys in their server.yaml, then start "
                "again")
    if "[code: 2001]" in text:
        return (f"{where} only admits registered sites, and this site has no key (code 2001): make one "
                "(mkdir -p keys && ssh-keygen -t ecdsa -b 384 -N \"\" -f keys/SITE), set private_key in "
                "site.yaml, send keys/SITE.pub to the coordinator, and start again")
    if "cannot be parsed" in text or "Exit Code: 600" in text:
        return f"the coordinator address '{settings.superlink}' cannot be parsed: set superlink to HOST:PORT"
    if "401 Unauthorized" in text or (lost_connection and "Giving up reconnection" not in text):
        return (f"{where} no longer knows this SuperNode: the coordinator was restarted with a new "
                "federation (not resumed); start fedqc-client again to join it")
    if "Giving up reconnection" in text or "Connection refused" in text or "Errno 111" in text:
        given_up = re.search(r"Giving up reconnection after ([\d.]+) seconds", text)
        after = f" after {float(given_up.group(1)):.0f} s" if given_up else ""
        return (f"cannot reach {where}{after}: check superlink (host and port) in site.yaml, that "
                "fedqc-server runs there, and that no firewall blocks the port")
    if "SSL" in text or "TLS" in text:
        line = next((x for x in reversed(text.splitlines()) if "SSL" in x or "TLS" in x), "")
        hint = " (this site runs --insecure: the coordinator uses TLS?)" if insecure else ""
        return f"the TLS connection to {where} failed: {line.strip()}{hint}"
    errors = [x.strip() for x in text.splitlines() if re.search(r"Error|ERROR|Exception|failed", x)]
    last = errors[-1] if errors else "no reason in its log"
    return f"the SuperNode stopped (exit {code}): {last}; its log: {log_path}"


def _say(line: str) -> None:
    print(f"fedqc-client: {line}", file=sys.stderr)


def run_client(site_config_path: str | Path | None, insecure: bool, *, settings: ClientSettings,
               echo: Echo = _say, connect_timeout_s: float | None = 300.0) -> int:
    """fedqc-client: run this site's SuperNode until Ctrl-C / SIGTERM / SIGHUP, saying what it does.

    The SuperNode's log (``WORK/logs/supernode.log``) is followed: joining, losing and regaining the
    coordinator are said on the terminal; a SuperNode that stops by itself is always a failure
    (it never ends on its own when all is well), said in one line with what to do
    (:func:`explain_supernode_exit`).

    Args:
        site_config_path: the site YAML, passed to the site factory as node config ``site-config``.
        insecure: connect without TLS (says so loudly).
        settings: the site's connection, keys, work dir and node config.
        echo: where the operator's lines go (stderr, prefixed ``fedqc-client:``).
        connect_timeout_s: give up when the first connection has not succeeded after this long
            (None: wait as long as the SuperNode retries).

    Returns:
        1 when the SuperNode stopped or could not join, 128 + signal when stopped by a signal.
    """
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    if site_config_path is not None:
        node_config = {**settings.node_config, "site-config": str(Path(site_config_path).resolve())}
        settings = ClientSettings(**{**settings.__dict__, "node_config": node_config})
    node = SuperNode(settings, insecure)
    offset = start = node.log_path.stat().st_size if node.log_path.is_file() else 0
    worker_log = node.work_dir / "logs" / "worker.log"
    worker_offset = worker_log.stat().st_size if worker_log.is_file() else 0
    where = f"the coordinator at {settings.superlink}"
    echo(f"site {settings.site_id}: joining {where} (log: {node.log_path})")
    started = time.monotonic()
    connected = lost = retrying = False
    try:
        node.spawn()
        if node.worker is not None:
            echo(f"site worker started (pid {node.worker.proc.pid}; it holds the site between tasks; log: "
                 f"{node.worker.log_path})")
        polls = 0
        while True:
            if polls % 4 == 0:
                node.remember_children()
            polls += 1
            restarted = node.supervise_worker()
            if restarted:
                echo(restarted)
            worker_lines, worker_offset = _new_lines(worker_log, worker_offset)
            for line in worker_lines:
                task = re.search(r"run (\S+): (\w+), phase round (\S+) \(exchange (\S+)\)", line)
                if task:
                    echo(f"task {task.group(2)}, phase round {task.group(3)} (exchange {task.group(4)} of run "
                         f"{task.group(1)})")
            code = node.proc.poll()
            lines, offset = _new_lines(node.log_path, offset)
            for line in lines:
                text = plain(line)
                if "SuperNode ID:" in text and not connected:
                    connected = True
                    echo(f"connected to {where}; waiting for its tasks (Ctrl-C to leave)")
                elif "Connection attempt failed" in text:
                    if connected and not lost:
                        lost = True
                        echo(f"lost the connection to {where}; reconnecting")
                    elif not connected and not retrying:
                        retrying = True
                        limit = f" for up to {connect_timeout_s:.0f} s" if connect_timeout_s else ""
                        echo(f"cannot reach {where} yet; retrying{limit}")
                elif "Connection successful" in text and lost:
                    lost = False
                    echo(f"reconnected to {where}")
                elif re.search(r"site \S+: task \S+ failed", text):
                    echo(f"a task failed at this site ({text.split(':', 1)[-1].strip()}); the coordinator "
                         f"is told only the exception type; traceback in {node.log_path}")
            if code is not None:
                text = _read_from(node.log_path, start)
                if connected:  # what happened after it joined
                    text = text[text.rfind("SuperNode ID:"):]
                echo("error: " + explain_supernode_exit(text, settings, insecure, code, node.log_path, lost))
                return 1
            if not connected and connect_timeout_s and time.monotonic() - started > connect_timeout_s:
                echo(f"error: cannot reach {where} after {connect_timeout_s:.0f} s: check superlink (host and "
                     "port) in site.yaml, that fedqc-server runs there, and that no firewall blocks the port"
                     + (" (this site runs --insecure: does the coordinator use TLS?)" if insecure else ""))
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt as exc:
        why = f"stopped by {exc.args[0]}" if isinstance(exc, processes.Terminated) else "interrupted"
        echo(f"{why}: this site's SuperNode was stopped; files in {node.work_dir} are kept")
        return getattr(exc, "exit_code", 130)
    finally:
        node.stop()


def _read_from(path: Path, offset: int, limit: int = 100_000) -> str:
    """What ``path`` holds after byte ``offset`` (its last ``limit`` bytes at most)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(offset, path.stat().st_size - limit))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines appended to ``path`` after byte ``offset``, and the offset after them."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    return data[:end + 1].decode(errors="replace").splitlines(), offset + end + 1
