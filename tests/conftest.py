"""Shared fixtures: a tiny simulated consortium, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# Tests run on 2 cores next to other processes: one torch thread each keeps them predictable. Two
# pytest-xdist workers (pyproject's addopts) with two threads each contend badly; child processes
# (fedqc commands, Flower's SuperNodes and ClientApps, Ray workers) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Session fixtures that build something expensive: under pytest-xdist (``-n 2 --dist loadgroup``,
# pyproject's addopts) the tests using one run on one worker, so it is built once, not once per worker.
SHARED_SESSION_FIXTURES = {"trained", "fedprox_run", "audited_run", "failed_then_resumed_run"}


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Under xdist: modules with slow tests first, and tests grouped by the expensive fixtures they
    share: the session fixtures above and every module or class scoped fixture of the suite
    (``xdist_group`` marks; an explicit mark is kept)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each worker keeps a few tests queued: the long ones must start early, the quick ones fill
        # the end. Stable, and modules stay contiguous (every worker sorts alike, as xdist requires).
        slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.path not in slow_modules)
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            shared = _shared_fixtures(item)
            if shared:
                item.add_marker(pytest.mark.xdist_group(min(shared)))
    result = yield  # xdist's worker hook turns each mark into a ``@group`` suffix of the node id here
    if getattr(config.option, "loadgroup", False):
        _group_suffix_fallback(items)
    return result


def _shared_fixtures(item) -> set[str]:
    fixture_info = getattr(item, "_fixtureinfo", None)
    shared = set()
    for name in getattr(item, "fixturenames", ()):
        defs = fixture_info.name2fixturedefs.get(name) if fixture_info else None
        if name in SHARED_SESSION_FIXTURES:
            shared.add(name)
        elif defs and defs[-1].scope in ("module", "class") and defs[-1].baseid:
            shared.add(f"{item.path.stem}.{name}")
    return shared


def _group_suffix_fallback(items) -> None:
    """pytest-xdist <= 3.8 sets ``item._nodeid``, which pytest >= 9.2 no longer reads (structured node
    ids), so ``--dist loadgroup`` silently stops grouping (pytest-dev/pytest-xdist#1386). Add the same
    ``@group`` suffix where xdist's did not take; does nothing once xdist's does."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # an older pytest: xdist's own suffix works there
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid and isinstance(getattr(item, "_id", None), NodeId):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")


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


def disc_cases(rng, sizes, size: int = 40, no_rv: tuple[int, ...] = (), r_max: float = 9.0,
               full_range: bool = False) -> list:
    """Synthetic cases whose 'images' are label maps of random discs (LV 1, MYO 2, RV 3), one stack
    of ``sizes[i]`` slices per case: a rounding 'segmenter' predicts them exactly. ``no_rv``: cases
    without an RV (the empty-structure convention); ``full_range``: every slice spans 0..3 (one RV
    pixel in a corner), so a gamma on its min-max normalised intensities keeps its rounded labels."""
    from types import SimpleNamespace

    import numpy as np

    from fedqc.data.site import PreparedCase

    yy, xx = np.mgrid[:size, :size]
    cases = []
    for i, z in enumerate(sizes):
        stack = np.zeros((z, size, size), np.float32)
        for k in range(z):
            for label in (1, 2, 3):
                if label == 3 and i in no_rv:
                    continue
                cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(3, r_max)
                stack[k][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = label
            if full_range:
                stack[k, 0, 0] = 3
        cases.append(PreparedCase(case=SimpleNamespace(case_id=f"c{i}"), images=stack, labels=None, geometry=None,
                                  spacing_mm=(8.0 + i, 1.5, 1.25)))
    return cases


def site_algos(config, work: Path, views: str = "SA") -> list:
    """The real site algorithm of every site of ``config``, each with its work dir under ``work``, the
    run config flattened as the coordinator sends it (no Flower)."""
    from fedqc.config import to_dict
    from fedqc.config.flat import encode_value, flatten
    from fedqc.site.algorithm import make_site_algo

    settings = to_dict(config)
    settings.pop("sites")
    settings.pop("simulated", None)
    run_config = flatten(settings)
    algos = []
    for site in config.sites:
        node = {"site-id": site.name, "work-dir": str(work / site.name), "root": str(site.root),
                "filter": encode_value(dict(site.filter)), "labelled": site.labelled,
                "test-fraction": site.test_fraction, "views": views}
        algos.append(make_site_algo(node, run_config))
    return algos
