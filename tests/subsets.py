"""Small copies of the tiny consortium for tests that change files (corrupt, add, remove)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path


def subset(tiny_data: Path, dest: Path, n: int) -> Path:
    """``dest``: the first ``n`` subjects of each centre of ``tiny_data``, with the metadata CSV
    (made once per ``dest``)."""
    if dest.exists():
        return dest
    dest.mkdir(parents=True)
    with open(tiny_data / "dataset_information.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = []
    for centre in sorted({r["CENTRE"] for r in rows}):
        kept += [r for r in rows if r["CENTRE"] == centre][:n]
    for row in kept:
        shutil.copytree(tiny_data / row["SUBJECT_CODE"], dest / row["SUBJECT_CODE"])
    with open(dest / "dataset_information.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return dest


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes (a transfer that stopped half way)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (qc.csv, the metadata)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
