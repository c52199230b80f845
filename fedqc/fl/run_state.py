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
Every file is written through :mod:`fedqc.core.io` (temp file, fsync, rename, 0600): a kill at any
moment leaves the previous version intact, and state.json always names a complete weights file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedqc.core.errors import DataError
from fedqc.core.io import (  # noqa: F401
    atomic_write,
    load_arrays,
    private_dir,
    read_json,
    save_arrays,
    write_json,
)

STATE = "state.json"
LOG = "log.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


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


@dataclass(frozen=True)
class FinishedRun:
    """What a finished run leaves for scoring: its state, final global weights and m_best."""

    state: dict
    final: dict[str, np.ndarray]  # m<i>/seg/<view>/..., ae/<view>/..., ctl/...
    supervised: list[dict[str, np.ndarray]]  # the m_best supervised global weights, best first


def load_finished(run_dir: Path) -> FinishedRun:
    """The weights of a run the protocol completed (``state.json`` phase ``done``).

    Raises:
        DataError: naming ``state.json`` when the run is missing or not finished.
    """
    path = Path(run_dir) / STATE
    state = read_json(path) if path.is_file() else {}
    if state.get("phase") != "done":
        raise DataError(path, f"is not a finished run (phase {state.get('phase')!r}); "
                              "only a run that `fedqc simulate` / `fedqc-server` completed can be scored")
    return FinishedRun(state, load_arrays(Path(run_dir) / state["weights"]),
                       [load_arrays(supervised_checkpoint(run_dir, r)) for r in state.get("candidates") or []])
