"""fedqc's multi-centre cardiac cine-MRI simulator: the embedded default data (docs/SIMULATOR.md).

:func:`simulate_dataset` writes an M&Ms-2 style data set: ``OUT/NNN/NNN_{SA,LA}_{ED,ES}[_gt].nii.gz``,
``OUT/dataset_information.csv`` and ``OUT/preview.png``. Subjects are anatomically varied hearts
(with the M&Ms-2 pathologies) in a thorax, imaged by centres whose scanners differ the way real ones do.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedqc.core.errors import ConfigError, DataError
from fedqc.core.types import PHASES, VIEWS
from fedqc.data.simulator.anatomy import DISEASES
from fedqc.data.simulator.presets import (
    PRESETS,
    CentreSpec,
    Preset,
    get_preset,
    preset_table,
)
from fedqc.data.simulator.subject import SimulatedSubject, simulate_subject
from fedqc.data.simulator.write import (
    PreviewPanel,
    save_nifti,
    write_metadata_csv,
    write_preview,
)

__all__ = ["DISEASES", "PRESETS", "SIMULATOR_VERSION", "Preset", "get_preset", "preset_table", "simulate_dataset",
           "stale_simulation"]

#: Bumped whenever the same seed gives other data; written to ``simulator.json`` beside the data.
#: 2: the RV wraps a thickened septum (HCM kept an RV at ES) and the four-chamber plan cuts every
#: structure at both phases (docs/SIMULATOR.md).
SIMULATOR_VERSION = 2
STAMP_FILE = "simulator.json"

PREVIEW_SUBJECTS_PER_CENTRE = 3
_PROGRESS_BATCH = 8


def simulate_dataset(out_dir: Path, preset: str = "consortium", subjects_per_centre: int | None = None,
                     seed: int = 0, progress: Callable[[str], None] | None = print,
                     shift_strength: float | None = None) -> Path:
    """Write a simulated multi-centre data set, deterministically for a given seed.

    The data set is assembled in a sibling folder and moved into place at the end, so an
    interrupted run never leaves a half-written ``out_dir`` behind.

    Args:
        out_dir: where to write; must not exist yet or be empty.
        preset: a name in :data:`PRESETS` (``consortium``, ``quickstart``, ``tiny``).
        subjects_per_centre: overrides the preset's default.
        seed: the same seed gives byte-identical files.
        progress: called with a short message per centre and per batch of subjects; None is silent.
        shift_strength: overrides the preset's shift strength of the centres not meant to be labelled.

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: for an unknown preset or a bad count / shift strength.
        DataError: when ``out_dir`` exists and is not an empty folder.
    """
    spec = get_preset(preset, shift_strength)
    n = spec.subjects_per_centre if subjects_per_centre is None else subjects_per_centre
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n * len(spec.centres) > 999:
        raise ConfigError("simulated.subjects_per_centre",
                          f"must be an integer from 1 to {999 // len(spec.centres)}, got {n!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(out_dir, "exists and is not an empty folder; choose a new --out or remove it")
    say = progress or (lambda _message: None)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    rows: list[dict[str, object]] = []
    preview: list[tuple[str, list[PreviewPanel]]] = []
    say(f"simulating preset '{spec.name}': {len(spec.centres)} centres x {n} subjects, seed {seed}, "
        f"shift strength {spec.shift_strength:g}")
    for c_index, centre in enumerate(spec.centres):
        intent = "labelled" if centre.labelled else "shifted, unlabelled"
        say(f"centre {centre.centre} ({centre.vendor} {centre.scanner} {centre.field_t:g} T, {intent})")
        diseases = _disease_sequence(centre, n, seed)
        panels: list[PreviewPanel] = []
        for j in range(n):
            code = f"{c_index * n + j + 1:03d}"
            subject = simulate_subject(np.random.default_rng([seed, centre.centre, j]), diseases[j], centre,
                                       spec.shift_strength, spec.depths)
            _write_subject(partial / code, code, subject)
            rows.append(_metadata_row(code, centre, subject))
            if j < PREVIEW_SUBJECTS_PER_CENTRE:
                panels += _preview_panels(code, subject)
            if (j + 1) % _PROGRESS_BATCH == 0 or j + 1 == n:
                say(f"  centre {centre.centre}: {j + 1}/{n} subjects")
        preview.append((f"centre {centre.centre}: {centre.vendor} {centre.scanner} {centre.field_t:g} T\n({intent})",
                        panels))
    write_metadata_csv(partial / "dataset_information.csv", rows)
    write_preview(partial / "preview.png", preview)
    (partial / STAMP_FILE).write_text(json.dumps({
        "simulator_version": SIMULATOR_VERSION, "preset": spec.name, "subjects_per_centre": n, "seed": seed,
        "shift_strength": spec.shift_strength}, indent=1) + "\n")
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    say(f"wrote {len(rows)} subjects to {out_dir} (preview: {out_dir / 'preview.png'})")
    return out_dir


def _disease_sequence(centre: CentreSpec, n: int, seed: int) -> list[str]:
    """Diseases for a centre's subjects: every disease before any repeats, in a seeded order."""
    rng = np.random.default_rng([seed, centre.centre, 7919])
    sequence: list[str] = []
    while len(sequence) < n:
        sequence += [centre.diseases[i] for i in rng.permutation(len(centre.diseases))]
    return sequence[:n]


def _write_subject(folder: Path, code: str, subject: SimulatedSubject) -> None:
    folder.mkdir()
    for view in VIEWS:
        for phase in PHASES:
            stem = folder / f"{code}_{view}_{phase}"
            save_nifti(stem.with_name(stem.name + ".nii.gz"), subject.images[(view, phase)], subject.affines[view])
            save_nifti(stem.with_name(stem.name + "_gt.nii.gz"), subject.labels[(view, phase)], subject.affines[view])


def _metadata_row(code: str, centre: CentreSpec, subject: SimulatedSubject) -> dict[str, object]:
    p = subject.protocol
    return {
        "SUBJECT_CODE": code, "DISEASE": subject.anatomy.disease, "VENDOR": centre.vendor, "SCANNER": centre.scanner,
        "FIELD": centre.field_t, "CENTRE": centre.centre, "SIM_LABELLED_INTENT": centre.labelled,
        "SIM_SEVERITY": round(p.severity, 3), "SIM_DISEASE_SEVERITY": round(subject.anatomy.disease_severity, 3),
        "SIM_PIXEL_SPACING_MM": round(p.geometry.spacing_mm[0], 3),
        "SIM_SLICE_SPACING_MM": round(float(np.linalg.norm(subject.affines["SA"][:3, 2])), 3),
        "SIM_SA_SLICES": subject.images[("SA", "ED")].shape[2],
        "SIM_SNR": round(p.contrast["blood"] / max(p.noise_fraction, 1e-6), 1),
        "SIM_BLOOD_MYO_RATIO": round(p.contrast["blood"] / max(p.contrast["myocardium"], 1e-6), 2),
    }


def _preview_panels(code: str, subject: SimulatedSubject) -> list[PreviewPanel]:
    sa, sa_gt = subject.images[("SA", "ED")], subject.labels[("SA", "ED")]
    mid = sa.shape[2] // 2
    caption = f"{code} {subject.anatomy.disease} s={subject.protocol.severity:.2f}"
    return [PreviewPanel(sa[:, :, mid].astype(np.float32), sa_gt[:, :, mid], f"{caption} SA"),
            PreviewPanel(subject.images[("LA", "ED")][:, :, 0].astype(np.float32),
                         subject.labels[("LA", "ED")][:, :, 0], f"{caption} LA")]


def stale_simulation(root: Path) -> str | None:
    """Why the simulated data at ``root`` is not what this simulator writes, or None when it is.

    Data without a stamp, or stamped by another :data:`SIMULATOR_VERSION`, stays usable; the caller
    says so, because results on it differ from results on freshly simulated data.
    """
    stamp = Path(root) / STAMP_FILE
    try:
        version = json.loads(stamp.read_text()).get("simulator_version")
    except FileNotFoundError:
        version = 1
    except (OSError, ValueError, AttributeError) as exc:
        return f"{stamp} cannot be read ({exc})"
    if version == SIMULATOR_VERSION:
        return None
    return (f"{root} was simulated by simulator version {version}, this fedqc writes version {SIMULATOR_VERSION}; "
            f"results on it differ from the documented ones: move the folder away to simulate it again")
