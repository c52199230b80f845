"""The run directory: what training and refinement leave behind, written atomically.

```
RUN/config.yaml                         the resolved config the run used
RUN/<view>/<stage>/candidate_<i>.pt     the m_best segmenters, rank order (stage: supervised | refined)
RUN/<view>/<stage>/candidates.json      their scores and epochs
RUN/<view>/qc_autoencoder.pt            the frozen QC autoencoder
RUN/<view>/thresholds/<name>.json       Tukey fences (fedqc.qc.thresholds)
```
Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written checkpoint behind and earlier files stay intact.

What refinement and fences derive from a training belongs to that training: :func:`training_id`
hashes a view's supervised candidates and autoencoder; the refined ``candidates.json`` and the
fences record it (``"training"``; :func:`fedqc.predict.folder.write_fences`), :func:`check_refined`
refuses refined models of another one, and
:func:`clear_derived` removes what a new ``fedqc train`` makes stale.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from fedqc.config import Config, config_from_dict, to_dict
from fedqc.core.errors import DataError
from fedqc.core.io import atomic_write, write_json  # noqa: F401
from fedqc.core.types import View
from fedqc.models.factory import frozen_autoencoder, segmenters_from_states

STAGES = ("supervised", "refined")


def save_config(run: Path, config: Config) -> Path:
    return atomic_write(run / "config.yaml", yaml.safe_dump(to_dict(config)))


def load_run_config(run: Path) -> Config:
    path = run / "config.yaml"
    if not path.is_file():
        raise DataError(run, "not a fedqc run directory (config.yaml missing); create one with 'fedqc train'")
    return config_from_dict(yaml.safe_load(path.read_text()), base_dir=run)


def save_candidates(run: Path, view: View, stage: str, states: Sequence[Mapping[str, torch.Tensor]],
                    info: Sequence[Mapping[str, Any]]) -> None:
    folder = run / view / stage
    for i, state in enumerate(states):
        atomic_write(folder / f"candidate_{i}.pt", lambda tmp, s=state: torch.save(dict(s), tmp))
    for stale in folder.glob("candidate_*.pt"):
        if int(stale.stem.split("_")[1]) >= len(states):
            stale.unlink()
    write_json(folder / "candidates.json", list(info))


def has_stage(run: Path, view: View, stage: str) -> bool:
    return (run / view / stage / "candidate_0.pt").is_file()


def training_id(run: Path, view: View) -> str:
    """A short hash of the files of ``view``'s supervised training (candidates and autoencoder)."""
    folder = run / view
    paths = sorted((folder / "supervised").glob("candidate_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    digest = hashlib.sha256()
    for path in [*paths, folder / "qc_autoencoder.pt"]:
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


# What a training makes stale in its view folder: derived from the previous supervised models.
DERIVED = ("refined", "thresholds", "refine_log.json")


def clear_derived(run: Path, view: View) -> list[Path]:
    """Remove what was derived from ``view``'s previous training (refined models, fences, refine log)."""
    removed = []
    for name in DERIVED:
        path = run / view / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def check_refined(run: Path, view: View) -> None:
    """Refined models must come from the current supervised training of ``view``.

    Raises:
        DataError: naming the refined folder, when its ``candidates.json`` records another training
            (or none).
    """
    folder = run / view / "refined"
    try:
        info = json.loads((folder / "candidates.json").read_text())
        recorded = {str(entry.get("training", "")) for entry in info}
    except (OSError, ValueError, AttributeError, TypeError):
        recorded = set()
    current = training_id(run, view)
    if recorded != {current}:
        was = ", ".join(sorted(r for r in recorded if r)) or "none recorded"
        raise DataError(folder, f"refined from another training (training {was}; the supervised models now are "
                                f"training {current}); rerun 'fedqc refine', or predict with --stage supervised")


def load_candidate_states(run: Path, view: View, stage: str) -> list[dict[str, torch.Tensor]]:
    folder = run / view / stage
    paths = sorted(folder.glob("candidate_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not paths:
        raise DataError(folder, f"no {stage} checkpoints for view {view}; run 'fedqc train' first")
    if stage == "refined":
        check_refined(run, view)
    states = []
    for path in paths:
        try:
            states.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # a truncated or foreign file
            raise DataError(path, f"unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    return states


def load_candidates(run: Path, view: View, stage: str, config: Config, device: torch.device) -> list[torch.nn.Module]:
    return segmenters_from_states(config, load_candidate_states(run, view, stage), device)


def save_autoencoder(run: Path, view: View, state: Mapping[str, torch.Tensor]) -> Path:
    return atomic_write(run / view / "qc_autoencoder.pt", lambda tmp: torch.save(dict(state), tmp))


def load_autoencoder(run: Path, view: View, config: Config, device: torch.device) -> torch.nn.Module:
    path = run / view / "qc_autoencoder.pt"
    if not path.is_file():
        raise DataError(path, f"QC autoencoder for view {view} missing; run 'fedqc train' first")
    return frozen_autoencoder(config, torch.load(path, map_location="cpu", weights_only=True), device)


def thresholds_path(run: Path, view: View, name: str) -> Path:
    """Where a fence set is kept (the folder is created)."""
    folder = run / view / "thresholds"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.json"
