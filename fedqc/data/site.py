"""One site's data, ready for the networks: discover, filter, preprocess and split its cases.

A site is a data root plus an optional metadata filter (``fedqc.config.SiteConfig``). Its cases
are read once, preprocessed into network-grid slice stacks (kept with the geometry that undoes
the preprocessing) and split by subject into training / validation (labelled sites), an
adaptation pool (unlabelled cases) and held-out test subjects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from fedqc.config import Config, PreprocessConfig, SiteConfig
from fedqc.core.errors import DataError, FedqcError
from fedqc.core.types import View
from fedqc.data.cache import load_preprocessed
from fedqc.data.mnms2 import Case, discover_cases, filter_cases
from fedqc.data.preprocess import Geometry, PreprocessSpec


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


class BadCasesError(DataError):
    """Several case files are unusable: each listed with its reason, all at once.

    Attributes:
        errors: the :class:`DataError` of every bad file (each names its file).
    """

    def __init__(self, errors: Sequence[DataError], what: str = "unusable case file(s)"):
        self.errors = list(errors)
        self.path = self.errors[0].path
        self.problem = what
        lines = "\n".join(f"  {e}" for e in self.errors)
        FedqcError.__init__(self, f"{len(self.errors)} {what}:\n{lines}")


def raise_collected(errors: Sequence[DataError], what: str = "unusable case file(s)") -> None:
    """Raise one :class:`BadCasesError` listing ``errors`` (nested lists flattened); nothing if empty."""
    flat: list[DataError] = []
    for error in errors:
        flat += error.errors if isinstance(error, BadCasesError) else [error]
    if flat:
        raise BadCasesError(flat, what)


def spec_from_config(cfg: PreprocessConfig) -> PreprocessSpec:
    return PreprocessSpec(spacing_mm=cfg.spacing_mm, size_px=cfg.size_px, crop=cfg.crop, normalise=cfg.normalise)


def site_cases(site: SiteConfig, views: Sequence[View]) -> list[Case]:
    """The site's cases: discovered under its root, then filtered on the metadata CSV."""
    cases = discover_cases(site.root, layout=site.layout, views=tuple(views))
    if site.filter:
        cases = filter_cases(cases, site.filter)
    if not cases:
        which = f"its filter {dict(site.filter)}" if site.filter else "no filter"
        raise DataError(site.root, f"site {site.name!r} has no {'/'.join(views)} case with {which}; "
                                   "check the site's root, filter and views")
    return cases


def prepare_case(case: Case, spec: PreprocessSpec, with_labels: bool,
                 label_remap: dict[int, int] | None = None, cache_dir: Path | None = None) -> PreparedCase:
    """Load and preprocess one case (from the site's cache when given); labels only when asked for.

    Without ``with_labels`` the label file is never opened, not even to centre the crop.
    """
    if not with_labels:
        case = dataclasses.replace(case, label=None)
    item = load_preprocessed(case, spec, cache_dir=cache_dir, remap=label_remap or None)
    return PreparedCase(case=case, images=item.image, labels=item.label, geometry=item.geometry,
                        spacing_mm=(slice_spacing_mm(case.image), spec.spacing_mm, spec.spacing_mm))


def slice_spacing_mm(path: Path) -> float:
    """The through-plane spacing from the NIfTI header alone (1.0 for a 2D file)."""
    try:
        zooms = nib.load(path).header.get_zooms()
    except Exception as exc:  # a file that changed since it was read, or a foreign one
        raise DataError(path, f"unreadable NIfTI header ({type(exc).__name__}: {exc})") from None
    return float(zooms[2]) if len(zooms) > 2 else 1.0


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


def plan_site_split(site: SiteConfig, view: View, config: Config) -> dict[str, list[Case]]:
    """Which of the site's ``view`` cases go to train / val / pool / test: the subject split of
    :func:`load_site_split`, from the file names and metadata alone (no image is read).

    Raises:
        DataError: no case, or too few subjects for a labelled site's training/validation split.
    """
    cases = site_cases(site, [view])
    subjects = [c.subject for c in cases]
    seed = config.train.seed
    test_subjects: set[str] = set()
    rest = sorted(set(subjects))
    if site.test_fraction > 0:
        rest_group, test_group = split_subjects(subjects, [1 - site.test_fraction, site.test_fraction], seed)
        rest, test_subjects = rest_group, set(test_group)
    val_subjects: set[str] = set()
    pool_subjects: set[str] = set()
    if site.labelled and site.unlabelled_fraction > 0:
        rest, pool_group = split_subjects(rest, [1 - site.unlabelled_fraction, site.unlabelled_fraction], seed + 2)
        pool_subjects = set(pool_group)
    if site.labelled:
        train_group, val_group = split_subjects(rest, [1 - config.train.val_fraction, config.train.val_fraction],
                                                seed + 1)
        if not train_group or not val_group:
            raise DataError(site.root, f"site {site.name!r} has too few subjects ({len(rest)}) for a "
                                       "training/validation split")
        val_subjects = set(val_group)
    plan: dict[str, list[Case]] = {"train": [], "val": [], "pool": [], "test": []}
    for case in cases:
        if case.subject in test_subjects:
            plan["test"].append(case)
        elif site.labelled and case.subject not in pool_subjects:
            plan["val" if case.subject in val_subjects else "train"].append(case)
        else:
            plan["pool"].append(case)
    return plan


def load_site_split(site: SiteConfig, view: View, config: Config, *, with_test_labels: bool = True,
                    progress: Callable[[str], None] | None = print, cache_dir: Path | None = None) -> SiteSplit:
    """Read one site's cases of ``view`` and split them by subject.

    Labelled sites: test subjects (``site.test_fraction``) are held out, the rest is split into
    training and validation (``train.val_fraction``), after ``site.unlabelled_fraction`` of it has
    gone to the site's adaptation pool (labels never read). Unlabelled sites: test subjects are held out
    and the rest is the adaptation pool, whose labels are never read. Test labels are read only
    for evaluation (``with_test_labels``). ``cache_dir`` keeps preprocessed cases between runs.

    Raises:
        BadCasesError: every unusable file of the site's ``view`` cases, listed at once (each is read).
    """
    spec = spec_from_config(config.preprocess)
    plan = plan_site_split(site, view, config)
    total = sum(map(len, plan.values()))
    split = SiteSplit(site=site.name, view=view)
    remap = dict(site.label_remap)
    errors: list[DataError] = []
    done = 0
    for part, cases in plan.items():
        for case in cases:
            try:
                if part == "test":
                    item = prepare_case(case, spec, with_test_labels, remap, cache_dir)
                elif part in ("train", "val"):
                    if case.label is None:
                        raise DataError(case.image, f"site {site.name!r} is labelled but this case has no label file")
                    item = prepare_case(case, spec, True, remap, cache_dir)
                else:
                    item = prepare_case(case, spec, False, cache_dir=cache_dir)
                getattr(split, part).append(item)
            except DataError as exc:
                errors.append(exc)
            done += 1
            if progress and done % 50 == 0:
                progress(f"  {site.name} {view}: prepared {done}/{total} cases")
    raise_collected(errors, f"unusable {view} case file(s) at site {site.name!r}")
    labelled = split.train + split.val
    if labelled and not any(np.any(c.labels) for c in labelled):
        raise DataError(site.root, f"every {view} label map of the labelled site {site.name!r} is empty (all 0): "
                                   "check the label files, or set the site's label_remap (docs/DATA.md)")
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


def ensure_data(config: Config, progress=print) -> None:
    """Generate simulated data for sites whose root does not exist yet (``simulated:`` in config)."""
    if config.simulated is None:
        return
    from fedqc.data.simulator import simulate_dataset, stale_simulation

    for root in sorted({site.root for site in config.sites}):
        if (root / "dataset_information.csv").is_file():
            stale = stale_simulation(root)
            if stale:
                progress(f"warning: {stale}")
            continue
        sim = config.simulated
        progress(f"simulating data ({sim.preset}, seed {sim.seed}) into {root} (first use)")
        simulate_dataset(root, preset=sim.preset, subjects_per_centre=sim.subjects_per_centre, seed=sim.seed,
                         shift_strength=sim.shift_strength)
