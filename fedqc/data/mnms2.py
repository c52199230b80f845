"""Find a site's cases on disk, attach the metadata CSV, filter by it and split by subject.

Layouts (docs/DATA.md): ``mnms2`` (``ROOT/NNN/NNN_{SA,LA}_{ED,ES}[_gt].nii.gz``), ``flat`` (the same
names directly in ROOT) and ``folder`` (any NIfTI names; labels ``X_gt`` beside or ``labels/X``).
Files with a ``CINE`` token (4D cine series) are ignored in every layout. Reading the metadata CSV
and filtering by it live in :mod:`fedqc.data.metadata`, re-exported here.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedqc.core.errors import ConfigError, DataError
from fedqc.core.types import PHASES, VIEWS, Phase, View
from fedqc.data.metadata import (
    METADATA_FILE,
    SUBJECT_COLUMN,
    FilterValue,
    filter_cases,
    natural_key,
    read_metadata,
    subject_key,
)

logger = logging.getLogger(__name__)

LAYOUTS = ("mnms2", "flat", "folder")
LABEL_FOLDER = "labels"
_NAME = re.compile(r"^(?P<subject>.+?)_(?P<view>SA|LA)_(?P<phase>ED|ES)(?P<gt>_gt)?$")


@dataclass(frozen=True)
class Case:
    """One image (one subject, view and phase) and, if annotated, its label file.

    Attributes:
        subject: subject code as found on disk (e.g. ``"001"``).
        view: ``"SA"`` or ``"LA"``.
        phase: ``"ED"`` or ``"ES"``.
        image: the image file.
        label: the label file, or None for an unlabelled case.
        meta: the subject's row of the metadata CSV (strings), empty if there is none.
    """

    subject: str
    view: View
    phase: Phase
    image: Path
    label: Path | None = None
    meta: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def case_id(self) -> str:
        """``"{subject}_{view}_{phase}"``, unique within a site."""
        return f"{self.subject}_{self.view}_{self.phase}"


def discover_cases(
    root: str | Path,
    layout: str = "auto",
    views: Iterable[str] = VIEWS,
    phases: Iterable[str] = PHASES,
) -> list[Case]:
    """List the cases under ``root``, with metadata attached, sorted by subject, view, phase.

    Args:
        root: the site's data folder.
        layout: ``"mnms2"``, ``"flat"``, ``"folder"`` or ``"auto"`` (the first of these, in this
            order, that finds any image).
        views: the views to keep.
        phases: the phases to keep.

    Returns:
        The cases; ``meta`` holds the subject's row of ``root/dataset_information.csv``, if any.

    Raises:
        ConfigError: for an unknown layout, view or phase.
        DataError: when ``root`` is not a folder, no image is found (naming the layouts tried), or
            two files claim the same case.
    """
    root = Path(root)
    if layout not in ("auto", *LAYOUTS):
        raise ConfigError("layout", f"'{layout}' is not one of auto, {', '.join(LAYOUTS)}")
    views, phases = _checked("views", views, VIEWS), _checked("phases", phases, PHASES)
    if not root.is_dir():
        raise DataError(root, "data folder not found" if not root.exists() else "not a folder")
    tried = LAYOUTS if layout == "auto" else (layout,)
    finders = {"mnms2": _find_mnms2, "flat": _pair_named, "folder": _find_folder}
    cases: list[Case] = []
    for name in tried:
        cases = [c for c in finders[name](root) if c.view in views and c.phase in phases]
        if cases:
            break
    if not cases:
        raise DataError(
            root, f"no NIfTI images found for views {list(views)} and phases {list(phases)} "
            f"(layouts tried: {', '.join(tried)}); see docs/DATA.md for the accepted layouts"
        )
    _check_unique(cases)
    metadata = read_metadata(root)
    cases = [replace(c, meta=dict(metadata.get(subject_key(c.subject), {}))) for c in cases]
    return sorted(cases, key=_sort_key)


def split_cases(
    cases: Sequence[Case], sizes: Sequence[float] | Sequence[int], seed: int = 0
) -> list[list[Case]]:
    """Split cases by subject, deterministically: a subject's views and phases stay together.

    Args:
        cases: the cases to split.
        sizes: fractions summing to 1 (e.g. ``[0.8, 0.2]``; rounded by largest remainder), or
            integer subject counts summing to at most the number of subjects (the rest unused).
        seed: seed of the subject shuffle.

    Returns:
        One sorted list of cases per entry of ``sizes``.

    Raises:
        ConfigError: when ``sizes`` is empty, negative, or does not add up.
    """
    subjects = sorted({c.subject for c in cases}, key=natural_key)
    counts = _split_counts(sizes, len(subjects))
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    bounds = np.cumsum([0, *counts])
    groups = [set(order[bounds[i] : bounds[i + 1]]) for i in range(len(counts))]
    return [sorted((c for c in cases if c.subject in g), key=_sort_key) for g in groups]


def _split_counts(sizes: Sequence[float] | Sequence[int], n: int) -> list[int]:
    if len(sizes) == 0 or any(not isinstance(s, int | float) or s < 0 for s in sizes):
        raise ConfigError("split", f"sizes must be non-negative numbers, got {list(sizes)}")
    if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        if sum(sizes) > n:
            raise ConfigError("split", f"counts {list(sizes)} exceed the {n} subjects available")
        return [int(s) for s in sizes]
    if not math.isclose(sum(sizes), 1.0, abs_tol=1e-6):
        raise ConfigError("split", f"fractions {list(sizes)} must sum to 1")
    exact = [s * n for s in sizes]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _find_mnms2(root: Path) -> list[Case]:
    cases: list[Case] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        cases += [c for c in _pair_named(folder) if c.subject == folder.name]
    return cases


def _pair_named(folder: Path) -> list[Case]:
    """Cases from strictly M&Ms-2 named files ``S_{SA,LA}_{ED,ES}[_gt].nii[.gz]`` in one folder."""
    images: dict[tuple[str, str, str], Path] = {}
    labels: dict[tuple[str, str, str], Path] = {}
    for path in _nifti_files(folder):
        match = _NAME.match(_stem(path))
        if match:
            key = (match["subject"], match["view"], match["phase"])
            found = labels if match["gt"] else images
            if key in found:
                raise DataError(path, f"duplicate of {found[key]} for case {'_'.join(key)}")
            found[key] = path
    for key in sorted(set(labels) - set(images)):
        logger.warning("%s: label without an image, ignored", labels[key])
    return [Case(*key, image=path, label=labels.get(key)) for key, path in images.items()]


def _find_folder(root: Path) -> list[Case]:
    """Cases from any NIfTI names; labels as ``X_gt`` beside the image or ``labels/X``."""
    label_dir = root / LABEL_FOLDER
    cases = []
    for path in _nifti_files(root):
        stem = _stem(path)
        if stem.endswith(("_gt", "_pred")):  # labels, and fedqc's own predictions
            continue
        tokens = stem.split("_")
        view = next((t for t in tokens if t in VIEWS), "SA")
        phase = next((t for t in tokens if t in PHASES), "ED")
        subject = "_".join(t for t in tokens if t not in (view, phase)) or stem
        options = [d / f"{name}{s}" for d, name in ((root, f"{stem}_gt"), (label_dir, stem))
                   for s in (".nii.gz", ".nii")]
        label = next((p for p in options if p.is_file()), None)
        cases.append(Case(subject, view, phase, image=path, label=label))  # type: ignore[arg-type]
    return cases


def _nifti_files(folder: Path) -> list[Path]:
    """NIfTI files directly in ``folder``, skipping hidden files and CINE series."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith(".")
        and "CINE" not in _stem(p).upper().split("_")
    )


def _stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def _check_unique(cases: Sequence[Case]) -> None:
    seen: dict[str, Path] = {}
    for case in cases:
        if seen.setdefault(case.case_id, case.image) != case.image:
            raise DataError(case.image, f"same case {case.case_id} as {seen[case.case_id]}")


def _checked(key: str, given: Iterable[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    given = tuple(given)
    wrong = [g for g in given if g not in allowed]
    if wrong or not given:
        raise ConfigError(key, f"{wrong or 'empty'}: expected a non-empty subset of {allowed}")
    return given


def _sort_key(case: Case) -> tuple:
    return (natural_key(case.subject), VIEWS.index(case.view), PHASES.index(case.phase))


__all__ = [
    "LABEL_FOLDER", "LAYOUTS", "METADATA_FILE", "SUBJECT_COLUMN", "Case", "FilterValue",
    "discover_cases", "filter_cases", "read_metadata", "split_cases", "subject_key",
]
