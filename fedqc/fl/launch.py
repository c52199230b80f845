"""Real SuperLink / SuperNode processes and the ``flwr`` CLI: what fedqc-server and fedqc-client run.

* :class:`SuperLink`: ``flower-superlink`` with Flower's home in ``RUN/.flwr`` (its database,
  the ``flwr`` connection ``config.toml``), runtime dependency installation, telemetry and update
  checks off; TLS from :class:`~fedqc.fl.settings.TlsFiles` unless ``insecure``; SuperNode
  authentication when site keys are given. :meth:`SuperLink.submit` runs ``flwr run APP fedqc
  --stream`` and reads the run's final status with ``flwr ls`` (``flwr run`` exits 0 even when the
  ServerApp fails).
* :class:`SuperNode`: ``flower-supernode`` for one site, node config from a TOML file in the
  site's work dir, Flower home ``WORK/.flwr``.
* :func:`run_server` / :func:`run_client`: the two commands, returning an exit code.

Every process is stopped by PID with its descendants (:mod:`fedqc.fl.processes`).
"""

from __future__ import annotations

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
from typing import Self

from fedqc.core.errors import ConfigError, FedqcError
from fedqc.fl import appdir, processes, run_state
from fedqc.fl.settings import ClientSettings, ServerSettings

CONNECTION = "fedqc"
QUIET_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
             "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
INSECURE_WARNING = "WARNING: --insecure: no TLS, traffic is readable on the network; use on loopback for tests only"
Echo = Callable[[str], None]


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


class _Daemon:
    """A Flower daemon we started: a context manager that stops it and its children by PID."""

    proc: subprocess.Popen | None
    stopped_pids: list[int]

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the daemon and its children (e.g. its flower-superexec) by PID."""
        if self.proc is not None:
            self.stopped_pids = processes.stop_tree(self.proc)

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
            for key in self.settings.site_public_keys:
                self.flwr(["supernode", "register", str(Path(key).resolve()), CONNECTION], check=True)
        except BaseException:
            self.stop()
            raise
        return self

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
        run_id, started = "", time.monotonic()
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
                        log_file.write(line)
                        log_file.flush()
                        echo(line.rstrip("\n"))
                        run_id = run_id or next(iter(re.findall(r"started run (\d+)", line)), "")
                    if max_seconds and time.monotonic() - started > max_seconds:
                        raise FedqcError(f"the run took longer than {max_seconds:.0f} s; stopped")
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



class SuperNode(_Daemon):
    """One site's SuperNode (a context manager that stops it).

    Args:
        settings: the site's connection, keys and node config.
        insecure: connect without TLS.
    """

    def __init__(self, settings: ClientSettings, insecure: bool):
        if not insecure and settings.root_certificates is None:
            raise ConfigError("client.root_certificates", "the consortium CA certificate is needed (or --insecure)")
        self.settings = settings
        self.insecure = insecure
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
        self.proc = processes.spawn(self.command(), flower_env(home), self.log_path, cwd=self.work_dir)
        return self.proc

    def start(self, ready_timeout_s: float = 60.0) -> Self:
        """Start the SuperNode and wait for its local ClientApp port."""
        self.spawn()
        try:
            processes.wait_for_port("127.0.0.1", self.settings.port, ready_timeout_s, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self



def run_server(config_path: str | Path | None, run_dir: str | Path, insecure: bool, *, settings: ServerSettings,
               resume: bool = False, echo: Echo = print, max_seconds: float | None = None) -> int:
    """fedqc-server: start a SuperLink, run the protocol as a Flower run, stop; 0 when it completed.

    Args:
        config_path: the server YAML (copied into the run directory for the record), or None.
        run_dir: the run directory (created; with ``resume``, an interrupted run's directory).
        insecure: no TLS (says so loudly).
        settings: where to listen, TLS, site keys, the protocol.
        resume: continue from ``RUN/state.json``.
        echo: where progress lines go.
        max_seconds: stop the run after this long (None: no limit).
    """
    run_dir = run_state.private_dir(Path(run_dir).resolve())
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    if resume and not (run_dir / run_state.STATE).is_file():
        raise FedqcError(f"{run_dir}: nothing to resume (no {run_state.STATE})")
    if config_path is not None:
        run_state.atomic_write(run_dir / "server.yaml", Path(config_path).read_bytes())
    settings.federation.to_json(run_dir / "federation.json")
    app = appdir.write_app(run_dir, appdir.run_config(settings.federation, run_dir, resume=resume))
    try:
        with SuperLink(run_dir, settings, insecure) as link:
            run_id = link.submit(app, echo=echo, max_seconds=max_seconds)
            status = link.status(run_id)
    except KeyboardInterrupt:
        echo(f"interrupted: the run and the SuperLink were stopped; continue with --resume {run_dir}")
        return 130
    run_state.write_json(run_dir / "flower-run.json", status)
    echo(f"run {run_id}: {status.get('status')} {status.get('status-details', '')}".rstrip())
    return 0 if status.get("status") == "finished:completed" else 1


def run_client(site_config_path: str | Path | None, insecure: bool, *, settings: ClientSettings) -> int:
    """fedqc-client: run this site's SuperNode until it stops or Ctrl-C; returns its exit code.

    Args:
        site_config_path: the site YAML, passed to the site factory as node config ``site-config``.
        insecure: connect without TLS (says so loudly).
        settings: the site's connection, keys, work dir and node config.
    """
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    if site_config_path is not None:
        node_config = {**settings.node_config, "site-config": str(Path(site_config_path).resolve())}
        settings = ClientSettings(**{**settings.__dict__, "node_config": node_config})
    node = SuperNode(settings, insecure).start()
    try:
        return node.proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        node.stop()
