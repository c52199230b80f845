"""Child processes we start and stop ourselves: spawn with a log file, wait for a port, stop by PID.

Flower's daemons spawn ``flower-superexec`` children (in their own process groups) which spawn
``flwr-serverapp`` / ``flwr-clientapp``. :func:`stop_tree` collects every descendant's PID before
signalling, asks them all to terminate (deepest first, then the parent), and kills what is still
alive after a grace period. Nothing is ever matched by name.

:func:`stop_on_signals` turns SIGTERM / SIGHUP (what ``kill``, systemd, ``timeout`` and a closed
terminal send) into :class:`Terminated`, a ``KeyboardInterrupt``, so the same clean-up that Ctrl-C
runs (every ``finally`` and context manager, each stopping its process tree) runs for them too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


class ProcessError(RuntimeError):
    """A child process failed to start or to become ready; the message quotes its log."""


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM, SIGHUP or SIGINT); ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, the first of ``signals`` raises :class:`Terminated` in the main thread; later ones
    are ignored, so a second Ctrl-C or SIGTERM cannot cut the clean-up short (every stop is bounded:
    SIGTERM, a grace period, SIGKILL). Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not raised:
            raised.append(signum)
            raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def spawn(command: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``command`` in its own session, stdout and stderr appended to ``log_path`` (0600)."""
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(list(command), env=dict(env), stdout=fd, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
    finally:
        os.close(fd)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file ('' when missing)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (via ``pgrep -P``; empty when none or pgrep is missing)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(p) for p in out.split()]


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, deepest first."""
    found: list[int] = []
    for child in children(pid):
        found.extend(descendants(child))
        found.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_tree(proc: subprocess.Popen | int, grace_s: float = 10.0, known: Sequence[int] = ()) -> list[int]:
    """Stop a process and all its descendants by PID; returns the PIDs that were signalled.

    SIGTERM goes to the descendants (deepest first) and then to the process; whatever still runs
    after ``grace_s`` gets SIGKILL. A Popen is reaped. ``known``: descendants seen earlier, stopped
    too when still alive (children of a process that died by itself hang below no PID we hold).
    """
    pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
    pids = descendants(pid) + [pid]
    pids = [p for p in known if p not in pids and alive(p)] + pids
    for target in pids:
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if isinstance(proc, subprocess.Popen):
            proc.poll()
        if not any(alive(p) for p in pids):
            break
        time.sleep(0.2)
    for target in pids:
        if alive(target):
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return pids


def port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None,
                  log_path: Path | None = None) -> None:
    """Wait until ``host:port`` accepts connections.

    Raises:
        ProcessError: ``proc`` exited first, or the port stayed closed for ``timeout_s``; the
            message quotes the end of ``log_path``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_tail(log_path) if log_path else ""
            raise ProcessError(f"{Path(proc.args[0]).name} exited with code {proc.returncode} before "
                               f"listening on {host}:{port}\n{tail}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    tail = log_tail(log_path) if log_path else ""
    raise ProcessError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s\n{tail}")


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MiB (shared pages counted per process)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_sampling_memory(command: Sequence[str], log_path: Path, interval_s: float = 0.5) -> dict:
    """Run ``command`` to its end, output to ``log_path``, sampling its process tree's memory.

    Returns ``exit_code``, ``wall_s``, ``peak_rss_mib`` (:func:`tree_rss_mib`) and ``samples``
    (``(seconds, MiB)`` pairs, one per ``interval_s``).
    """
    import threading

    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT)

        def sample() -> None:
            while proc.poll() is None:
                samples.append((round(time.monotonic() - started, 1), round(tree_rss_mib(proc.pid))))
                time.sleep(interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        sampler.join(timeout=5)
    return {"exit_code": code, "wall_s": round(time.monotonic() - started, 1),
            "peak_rss_mib": max((m for _, m in samples), default=0), "samples": samples}
