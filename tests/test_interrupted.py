"""Interrupted work at a site: ``fedqc predict`` / ``fedqc refine`` killed -9 mid-run.

What was written before the kill stays intact (every file is written to a temporary name and
renamed), the next run completes, and everything fedqc wrote is readable by its owner only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from fedqc.cli.main import main


def _fedqc(*args: str, log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-m", "fedqc.cli.main", *args], stdout=handle, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def _kill_when(proc: subprocess.Popen, ready, timeout_s: float = 300) -> bool:
    """kill -9 ``proc`` as soon as ``ready()``; False when it ended first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the command never reached the point to interrupt"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return True


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_predict_killed_mid_run_keeps_finished_files_and_the_rerun_completes(trained, tiny_data, tmp_path):
    _, run = trained
    out = tmp_path / "pred"
    proc = _fedqc("predict", "--run", str(run), "--data", str(tiny_data), "--out", str(out), log=tmp_path / "1.log")
    killed = _kill_when(proc, lambda: len(list(out.glob("*_pred.nii.gz"))) >= 5)
    assert killed, (tmp_path / "1.log").read_text()[-2000:]
    written = {p: p.read_bytes() for p in out.glob("*_pred.nii.gz")}
    assert 5 <= len(written) < 64 and not (out / "qc.csv").exists()
    for path in written:  # complete files under their final names, never partial ones
        assert set(np.unique(np.asarray(nib.load(path).dataobj))) <= {0, 1, 2, 3}

    # The rerun in its own process too, under a permissive umask: the command itself makes files private.
    old = os.umask(0o022)
    try:
        rerun = _fedqc("predict", "--run", str(run), "--data", str(tiny_data), "--out", str(out), log=tmp_path / "2.log")
        assert rerun.wait(timeout=600) == 0, (tmp_path / "2.log").read_text()[-2000:]
    finally:
        os.umask(old)
    assert len(list(out.glob("*_pred.nii.gz"))) == 64 and (out / "qc.csv").is_file()
    for path in _visible(out):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


def test_refine_killed_mid_run_leaves_the_supervised_models_intact_and_the_rerun_completes(trained, tmp_path):
    config, trained_run = trained
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    log = tmp_path / "refine.log"
    proc = _fedqc("refine", "--config", str(config), "--run", str(run), log=log)
    killed = _kill_when(proc, lambda: "refinement epoch 1/" in log.read_text())  # after epoch 1 of 2+
    assert killed, log.read_text()[-2000:]
    for path, data in before.items():  # the supervised candidates, autoencoders, config: untouched
        if "refined" not in path.parts and "thresholds" not in path.parts and path.suffix == ".pt":
            assert path.read_bytes() == data, f"{path} changed"
    for path in run.rglob("*.pt"):
        torch.load(path, weights_only=True)  # nothing unreadable under a final name

    assert main(["refine", "--config", str(config), "--run", str(run)]) == 0
    for view in ("SA", "LA"):
        assert (run / view / "refined" / "candidate_0.pt").is_file()
