"""The coordinator's run directory, written atomically (temp file + rename) after every round.

```
RUN/federation.json            the protocol settings of this run
RUN/app/pyproject.toml         the generated Flower app (run config; no code, no weights)
RUN/state.json                 where the protocol stands: phase, rounds done, m_best scores
RUN/log.json                   round-by-round log: per-site metrics, missing sites, alpha, bytes
RUN/summary.json               final figures (written when the protocol ends)
RUN/checkpoints/global-<n>.npz the global weights after exchange n (seg/..., ae/..., m<i>/...);
                               state.json names the current one
RUN/checkpoints/supervised-<round>.npz   global segmenters kept for m_best
RUN/audit/<site>.jsonl         keys / types / shapes of each reply a site sent (when audited)
RUN/.flwr/                     Flower home of a deployment (SuperLink database, config.toml)
RUN/logs/                      SuperLink, SuperNode and `flwr run` logs
```
A kill at any moment leaves the previous version of every file intact, and state.json always
names a complete weights file. Files are private (0600).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedqc.site.contract import Weights

STATE = "state.json"
LOG = "log.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, fsync it, then rename it over ``path`` (mode 0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return atomic_write(path, json.dumps(data, indent=2, default=str).encode())


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text())


def save_weights(path: Path, weights: Mapping[str, np.ndarray]) -> Path:
    """Atomically write flat weights as an uncompressed ``.npz`` (names are kept verbatim)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in weights.items()})
    return atomic_write(path, buffer.getvalue())


def load_weights(path: Path) -> Weights:
    """Read flat weights written by :func:`save_weights` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def checkpoint_path(run_dir: Path, name: str) -> Path:
    """``RUN/checkpoints/<name>.npz``."""
    return run_dir / CHECKPOINTS / f"{name}.npz"


def supervised_checkpoint(run_dir: Path, round_: int) -> Path:
    """The global segmenters after supervised round ``round_``."""
    return checkpoint_path(run_dir, f"supervised-{round_:03d}")


def prune_supervised(run_dir: Path, keep: set[int]) -> None:
    """Delete supervised checkpoints of rounds not in ``keep``."""
    for path in (run_dir / CHECKPOINTS).glob("supervised-*.npz"):
        if int(path.stem.split("-")[1]) not in keep:
            path.unlink()


def global_checkpoint(run_dir: Path, server_round: int) -> Path:
    """The global weights after exchange ``server_round``."""
    return checkpoint_path(run_dir, f"global-{server_round:04d}")


def current_global(run_dir: Path) -> Path:
    """The global weights file ``RUN/state.json`` names."""
    return Path(run_dir) / read_json(Path(run_dir) / STATE)["weights"]


def prune_globals(run_dir: Path, keep: Path) -> None:
    """Delete global weights files other than ``keep``."""
    for path in (run_dir / CHECKPOINTS).glob("global-*.npz"):
        if path != keep:
            path.unlink()
