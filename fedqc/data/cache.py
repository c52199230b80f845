"""Per-site cache of preprocessed cases, so federated rounds do not redo NIfTI I/O and resampling.

Each case is stored as ``CACHE/<case_id>-<key>.npz`` (the slices, and the label slices when the
case is labelled) beside ``CACHE/<case_id>-<key>.json`` (the geometry, spec and source files,
readable). ``key`` hashes the image and label paths, their modification times and sizes, the
preprocessing spec and the label remap: editing a file or the spec makes a new entry, and the
stale one for that case is deleted. Writes are atomic; an unreadable entry is recomputed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedqc.core.io import write_stream
from fedqc.core.types import FloatArray, LabelArray
from fedqc.data.mnms2 import Case
from fedqc.data.nifti import load_image, load_label
from fedqc.data.preprocess import (
    Geometry,
    PreprocessSpec,
    crop_centre_px,
    preprocess_image,
    preprocess_label,
)

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when preprocessing code changes what it produces
_KEY_CHARS = 16


@dataclass(frozen=True, eq=False)
class PreprocessedCase:
    """A case on the network grid.

    Attributes:
        case: the case it came from.
        image: float32 slices (Z, size, size).
        label: uint8 label slices (Z, size, size), or None for an unlabelled case.
        geometry: what :func:`fedqc.data.preprocess.restore_probabilities` needs.
    """

    case: Case
    image: FloatArray
    label: LabelArray | None
    geometry: Geometry


def cache_key(case: Case, spec: PreprocessSpec, remap: Mapping[int, int] | None = None) -> str:
    """Hex digest identifying the source files (path, mtime, size), the spec and the remap.

    Args:
        case: the case.
        spec: the preprocessing.
        remap: the label remap used when loading.

    Returns:
        A 16-character hex string.
    """

    def stamp(path: Path | None) -> list | None:
        if path is None:
            return None
        stat = path.stat()
        return [str(path.resolve()), stat.st_mtime_ns, stat.st_size]

    payload = {
        "version": CACHE_VERSION,
        "image": stamp(case.image),
        "label": stamp(case.label),
        "spec": asdict(spec),
        "remap": sorted((int(k), int(v)) for k, v in (remap or {}).items()),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:_KEY_CHARS]


def preprocess_case(
    case: Case, spec: PreprocessSpec, remap: Mapping[int, int] | None = None
) -> PreprocessedCase:
    """Load and preprocess one case (crop centred on the label's heart when ``spec.crop="heart"``).

    Args:
        case: the case.
        spec: the preprocessing.
        remap: label remap for :func:`fedqc.data.nifti.load_label`.

    Returns:
        The preprocessed case.

    Raises:
        DataError: from loading a bad image or label file.
    """
    volume = load_image(case.image)
    labels = None if case.label is None else load_label(case.label, volume, remap)
    image, geometry = preprocess_image(volume, spec, crop_centre_px(spec, labels))
    label = None if labels is None else preprocess_label(labels, geometry)
    return PreprocessedCase(case=case, image=image, label=label, geometry=geometry)


def load_preprocessed(
    case: Case,
    spec: PreprocessSpec,
    cache_dir: str | Path | None = None,
    remap: Mapping[int, int] | None = None,
) -> PreprocessedCase:
    """:func:`preprocess_case`, served from ``cache_dir`` when an up-to-date entry exists.

    Args:
        case: the case.
        spec: the preprocessing.
        cache_dir: the site's cache folder (created if needed); None disables caching.
        remap: label remap for :func:`fedqc.data.nifti.load_label`.

    Returns:
        The preprocessed case.

    Raises:
        DataError: from loading a bad image or label file.
    """
    if cache_dir is None:
        return preprocess_case(case, spec, remap)
    folder = Path(cache_dir)
    key = cache_key(case, spec, remap)
    stem = folder / f"{case.case_id}-{key}"
    cached = _read_entry(stem, case)
    if cached is not None:
        return cached
    result = preprocess_case(case, spec, remap)
    folder.mkdir(parents=True, exist_ok=True)
    _write_entry(stem, result, spec, key)
    _prune_stale(folder, case.case_id, key)
    return result


def _read_entry(stem: Path, case: Case) -> PreprocessedCase | None:
    npz, meta = _with(stem, ".npz"), _with(stem, ".json")
    if not (npz.is_file() and meta.is_file()):
        return None
    try:
        geometry = Geometry.from_dict(json.loads(meta.read_text())["geometry"])
        with np.load(npz) as arrays:
            image = arrays["image"].astype(np.float32)
            label = arrays["label"].astype(np.uint8) if "label" in arrays.files else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        logger.warning("%s: unreadable cache entry, recomputing (%s)", npz, exc)
        return None
    if (label is None) != (case.label is None):
        return None
    return PreprocessedCase(case=case, image=image, label=label, geometry=geometry)


def _write_entry(stem: Path, result: PreprocessedCase, spec: PreprocessSpec, key: str) -> None:
    arrays = {"image": result.image}
    if result.label is not None:
        arrays["label"] = result.label
    meta = {
        "key": key,
        "case_id": result.case.case_id,
        "image": str(result.case.image),
        "label": None if result.case.label is None else str(result.case.label),
        "spec": asdict(spec),
        "geometry": result.geometry.to_dict(),
    }
    # arrays first, JSON last: an entry only counts once both exist
    write_stream(_with(stem, ".npz"), lambda f: np.savez_compressed(f, **arrays))
    write_stream(_with(stem, ".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))


def _prune_stale(folder: Path, case_id: str, key: str) -> None:
    for suffix in (".npz", ".json"):
        for old in folder.glob(f"{glob.escape(case_id)}-{'?' * _KEY_CHARS}{suffix}"):
            if old.name != f"{case_id}-{key}{suffix}":
                old.unlink(missing_ok=True)


def _with(stem: Path, suffix: str) -> Path:
    return stem.parent / f"{stem.name}{suffix}"  # not with_suffix: a subject may contain dots
