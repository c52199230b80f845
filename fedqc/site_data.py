"""One site's data, ready for the networks: discover, filter, preprocess and split its cases.

A site is a data root plus an optional metadata filter (``fedqc.config.SiteConfig``). Its cases
are read once, preprocessed into network-grid slice stacks (kept with the geometry that undoes
the preprocessing) and split by subject into training / validation (labelled sites), an
adaptation pool (unlabelled cases) and held-out test subjects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedqc.config import Config, PreprocessConfig, SiteConfig
from fedqc.data.mnms2 import Case, discover_cases, filter_cases
from fedqc.data.nifti import Volume, load_image, load_label
from fedqc.data.preprocess import Geometry, PreprocessSpec, heart_centre_px, preprocess_image, preprocess_label
from fedqc.errors import DataError
from fedqc.types import View


@dataclass
class PreparedCase:
    """One (subject, view, phase) in the network grid.

    ``images`` and ``labels`` are (Z, H, W); ``spacing_mm`` is the grid's (z, h, w) spacing, used
    for Hausdorff distances in millimetres.
    """

    case: Case
    images: np.ndarray
    labels: np.ndarray | None
    geometry: Geometry
    spacing_mm: tuple[float, float, float]

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def subject(self) -> str:
        return self.case.subject


@dataclass
class SiteSplit:
    """A site's cases for one view, split by subject."""

    site: str
    view: View
    train: list[PreparedCase] = field(default_factory=list)
    val: list[PreparedCase] = field(default_factory=list)
    pool: list[PreparedCase] = field(default_factory=list)
    test: list[PreparedCase] = field(default_factory=list)


def spec_from_config(cfg: PreprocessConfig) -> PreprocessSpec:
    return PreprocessSpec(spacing_mm=cfg.spacing_mm, size_px=cfg.size_px, crop=cfg.crop, normalise=cfg.normalise)


def site_cases(site: SiteConfig, views: Sequence[View]) -> list[Case]:
    """The site's cases: discovered under its root, then filtered on the metadata CSV."""
    cases = discover_cases(site.root, layout=site.layout, views=tuple(views))
    if site.filter:
        cases = filter_cases(cases, site.filter)
    if not cases:
        raise DataError(site.root, f"site {site.name!r} has no cases for views {list(views)} after its filter")
    return cases


def prepare_case(case: Case, spec: PreprocessSpec, with_labels: bool,
                 label_remap: dict[int, int] | None = None) -> PreparedCase:
    """Load and preprocess one case; labels only when asked for and present."""
    volume: Volume = load_image(case.image)
    labels = None
    raw_labels = None
    if with_labels and case.label is not None:
        raw_labels = load_label(case.label, volume, remap=label_remap or None)
    centre = None
    if spec.crop == "heart" and raw_labels is not None and raw_labels.any():
        centre = heart_centre_px(raw_labels)
    images, geometry = preprocess_image(volume, spec, centre_px=centre)
    if raw_labels is not None:
        labels = preprocess_label(raw_labels, geometry)
    spacing = (float(volume.spacing_mm[2]), spec.spacing_mm, spec.spacing_mm)
    return PreparedCase(case=case, images=images, labels=labels, geometry=geometry, spacing_mm=spacing)


def split_subjects(subjects: Sequence[str], fractions: Sequence[float], seed: int) -> list[list[str]]:
    """Split subject codes into consecutive groups of the given fractions (the last takes the rest)."""
    order = sorted(set(subjects))
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    groups: list[list[str]] = []
    start = 0
    for frac in fractions[:-1]:
        count = int(round(frac * len(order)))
        groups.append(sorted(order[start:start + count]))
        start += count
    groups.append(sorted(order[start:]))
    return groups


def load_site_split(site: SiteConfig, view: View, config: Config, *, with_test_labels: bool = True,
                    progress: Callable[[str], None] | None = print) -> SiteSplit:
    """Read one site's cases of ``view`` and split them by subject.

    Labelled sites: test subjects (``site.test_fraction``) are held out, the rest is split into
    training and validation (``train.val_fraction``). Unlabelled sites: test subjects are held out
    and the rest is the adaptation pool, whose labels are never read. Test labels are read only
    for evaluation (``with_test_labels``).
    """
    spec = spec_from_config(config.preprocess)
    cases = site_cases(site, [view])
    subjects = [c.subject for c in cases]
    seed = config.train.seed
    test_subjects: set[str] = set()
    rest = sorted(set(subjects))
    if site.test_fraction > 0:
        rest_group, test_group = split_subjects(subjects, [1 - site.test_fraction, site.test_fraction], seed)
        rest, test_subjects = rest_group, set(test_group)
    split = SiteSplit(site=site.name, view=view)
    val_subjects: set[str] = set()
    if site.labelled:
        train_group, val_group = split_subjects(rest, [1 - config.train.val_fraction, config.train.val_fraction],
                                                seed + 1)
        if not train_group or not val_group:
            raise DataError(site.root, f"site {site.name!r} has too few subjects ({len(rest)}) for a "
                                       "training/validation split")
        val_subjects = set(val_group)
    remap = dict(site.label_remap)
    for i, case in enumerate(cases):
        if case.subject in test_subjects:
            split.test.append(prepare_case(case, spec, with_test_labels, remap))
        elif site.labelled:
            if case.label is None:
                raise DataError(case.image, f"site {site.name!r} is labelled but this case has no label file")
            target = split.val if case.subject in val_subjects else split.train
            target.append(prepare_case(case, spec, True, remap))
        else:
            split.pool.append(prepare_case(case, spec, False))
        if progress and (i + 1) % 50 == 0:
            progress(f"  {site.name} {view}: prepared {i + 1}/{len(cases)} cases")
    if progress:
        progress(f"  {site.name} {view}: train {len(split.train)}, val {len(split.val)}, "
                 f"pool {len(split.pool)}, test {len(split.test)} cases")
    return split


def stack_slices(cases: Sequence[PreparedCase]) -> tuple[np.ndarray, np.ndarray]:
    """All labelled slices of ``cases`` as (N, 1, H, W) images and (N, H, W) labels."""
    labelled = [c for c in cases if c.labels is not None]
    if not labelled:
        return np.zeros((0, 1, 1, 1), np.float32), np.zeros((0, 1, 1), np.uint8)
    images = np.concatenate([c.images for c in labelled])[:, None].astype(np.float32, copy=False)
    labels = np.concatenate([c.labels for c in labelled]).astype(np.uint8, copy=False)
    return images, labels


def data_root_exists(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())
