"""Keep the m_best checkpoints by validation score (the paper keeps m_best = 3 segmenters, not one)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedqc.core.io import write_stream

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Checkpoint:
    """One kept model.

    Attributes:
        epoch: the epoch (1-based) after which it was taken.
        score: its validation score (higher is better).
        state_dict: CPU copies of the weights.
        path: the file it was saved to, when a directory was given.
    """

    epoch: int
    score: float
    state_dict: StateDict
    path: Path | None = None


def cpu_state_dict(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    """Detached CPU copies of a model's (or a state dict's) tensors.

    Args:
        model_or_state: a module or a state dict.

    Returns:
        A new state dict sharing no storage with the model.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def save_atomically(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    Args:
        obj: what to save.
        path: the destination; readers never see a partial file.
    """
    write_stream(path, lambda handle: torch.save(obj, handle))


class TopKCheckpoints:
    """The k best checkpoints seen so far, by score (higher is better; NaN never enters).

    Ties keep the earlier epoch. Weights are copied only when a checkpoint enters the top k.

    Args:
        k: how many to keep (m_best).
        directory: when given, kept checkpoints are also saved there as ``{prefix}epoch{E:04d}.pt``
            (atomically) and evicted ones deleted.
        prefix: file name prefix.
    """

    def __init__(self, k: int = 3, directory: str | Path | None = None, prefix: str = "segmenter-"):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.directory = None if directory is None else Path(directory)
        self.prefix = prefix
        self._kept: list[Checkpoint] = []

    def would_keep(self, score: float) -> bool:
        """Whether a checkpoint with this score would enter the top k now."""
        if math.isnan(score):
            return False
        return len(self._kept) < self.k or score > self._kept[-1].score

    def consider(self, model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], epoch: int,
                 score: float) -> bool:
        """Offer a checkpoint; keep it if it is among the k best.

        Args:
            model_or_state: the model (or its state dict) to copy if kept.
            epoch: its epoch.
            score: its validation score.

        Returns:
            True when it was kept.
        """
        score = float(score)
        if not self.would_keep(score):
            return False
        path = None
        state = cpu_state_dict(model_or_state)
        if self.directory is not None:
            path = self.directory / f"{self.prefix}epoch{epoch:04d}.pt"
            save_atomically({"epoch": epoch, "score": score, "state_dict": state}, path)
        self._kept.append(Checkpoint(epoch, score, state, path))
        self._kept.sort(key=lambda c: (-c.score, c.epoch))
        for evicted in self._kept[self.k:]:
            if evicted.path is not None and evicted.path != path:
                evicted.path.unlink(missing_ok=True)
        self._kept = self._kept[: self.k]
        return True

    def ranked(self) -> list[Checkpoint]:
        """The kept checkpoints, best first."""
        return list(self._kept)

    def __len__(self) -> int:
        return len(self._kept)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file written by :class:`TopKCheckpoints`.

    Args:
        path: the file.

    Returns:
        The checkpoint, weights on CPU.
    """
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    return Checkpoint(int(data["epoch"]), float(data["score"]), data["state_dict"], Path(path))
