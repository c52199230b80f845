"""Shared fixtures: a tiny simulated consortium, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# Tests run on 2 cores next to other processes: one torch thread each keeps them predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """Tiny nets gain nothing from intra-op threads, and a shared CPU punishes oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_umask():
    """The CLI entry points tighten the process umask (fedqc.cli.main._private_files); tests calling them
    in-process must not pass that on to the next test."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Two centres (one labelled-intent, one shifted), 8 subjects each, small matrices."""
    from fedqc.data.simulator import simulate_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    simulate_dataset(root, preset="tiny", subjects_per_centre=8, seed=0, progress=None)
    return root


def tiny_config_dict(root: Path, **sections) -> dict:
    """A config over ``tiny_data`` sized to run each stage in seconds."""
    config = {
        "sites": [
            {"name": "centre1", "root": str(root), "filter": {"CENTRE": 1}, "labelled": True},
            {"name": "centre2", "root": str(root), "filter": {"CENTRE": 2}, "labelled": False,
             "test_fraction": 0.25},
        ],
        "preprocess": {"spacing_mm": 2.5, "size_px": 64},
        "model": {"preset": "tiny"},
        "train": {"epochs": 2, "batch_size": 8, "m_best": 2, "val_fraction": 0.4, "augment": False},
        "qc": {"ae_epochs": 2, "threshold_source": "unlabelled"},
        "refine": {"k_semi": 2, "batch_size": 8},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@pytest.fixture
def write_config(tmp_path):
    def write(data: dict, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_data):
    """``fedqc train`` on the tiny consortium: (config path, run directory). Fences at the quartiles
    (factor 0), so refinement surely has flagged cases. Tests that change the run copy it first."""
    from fedqc.cli.main import main

    folder = tmp_path_factory.mktemp("trained")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, qc={"tukey_factor": 0.0})))
    run = folder / "run"
    assert main(["train", "--config", str(config), "--out", str(run)]) == 0
    return config, run
