"""Timestamps of one message's path, for measuring where an exchange's time goes.

Off unless ``FEDQC_TRACE`` names a file (inherited by every process a run starts: the ServerApp
and the SuperNode's per-message ``flwr-clientapp`` processes). Each event appends one JSON line
(wall-clock seconds; one short ``write`` on an ``O_APPEND`` file, so processes do not interleave).
Events carry no data of any site: task names, node ids, process ids and times only.
``benchmarks/bench_federation.py --trace`` turns them into the median of each leg (docs/PERFORMANCE.md 4c).
"""

from __future__ import annotations

import json
import os
import time

ENV = "FEDQC_TRACE"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def process_start() -> float:
    """This process's start (wall-clock seconds), from ``/proc``; 0.0 where that is not readable."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as system:
            boot = next(float(line.split()[1]) for line in system if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


def event(name: str, **fields) -> None:
    """Append ``{"event": name, "t": now, "pid": ..., **fields}`` to the trace file, when tracing."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": name, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
