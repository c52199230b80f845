"""The site's metadata CSV: read it, key it by subject, and filter cases by its columns.

``ROOT/dataset_information.csv`` (M&Ms-2 columns SUBJECT_CODE, DISEASE, VENDOR, ...; comma,
semicolon or tab separated) is read into one row per subject; :mod:`fedqc.data.mnms2` attaches each
row to the subject's cases, and :func:`filter_cases` keeps the cases whose row matches a filter.
Re-exported by :mod:`fedqc.data.mnms2`.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedqc.core.errors import DataError

if TYPE_CHECKING:
    from fedqc.data.mnms2 import Case

logger = logging.getLogger(__name__)

METADATA_FILE = "dataset_information.csv"
SUBJECT_COLUMN = "SUBJECT_CODE"
FilterValue = str | int | float | Sequence[str | int | float]


def subject_key(code: str) -> str:
    """Normalise a subject code so ``1``, ``001`` and `` 001 `` match (digits zero-padded to 3)."""
    code = code.strip()
    return f"{int(code):03d}" if code.isdigit() else code


def read_metadata(root: str | Path) -> dict[str, dict[str, str]]:
    """Read ``root/dataset_information.csv`` (M&Ms-2 columns SUBJECT_CODE, DISEASE, VENDOR, ...).

    Args:
        root: the site's data folder.

    Returns:
        ``{subject_key(SUBJECT_CODE): {column: value}}`` with names and values stripped and
        SUBJECT_CODE normalised; empty when the file does not exist.

    Raises:
        DataError: naming the CSV when it is unreadable, lacks SUBJECT_CODE or repeats a subject.
    """
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        delimiter = max(",;\t", key=lines[0].count) if lines else ","
        rows = list(csv.DictReader(lines, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"unreadable metadata CSV ({exc})") from exc
    metadata: dict[str, dict[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        clean = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if SUBJECT_COLUMN not in clean:
            raise DataError(path, f"no {SUBJECT_COLUMN} column; columns are {sorted(clean)}")
        if not clean[SUBJECT_COLUMN]:
            continue
        key = subject_key(clean[SUBJECT_COLUMN])
        if key in metadata:
            raise DataError(path, f"line {line}: subject {key} appears twice")
        metadata[key] = {**clean, SUBJECT_COLUMN: key}
    return metadata


def filter_cases(
    cases: Sequence[Case],
    where: Mapping[str, FilterValue] | None,
    metadata_file: str | Path = METADATA_FILE,
) -> list[Case]:
    """Keep the cases whose metadata matches every ``column: value`` of ``where``.

    Values are compared as case-insensitive strings after normalising numbers (``1.5``,
    ``"1.50"`` and ``"1.5"`` match; so do ``3`` and ``"3.0"``); a list means any of its values.
    Cases of subjects missing from the CSV are skipped with a warning naming them.

    Args:
        cases: cases from :func:`discover_cases`.
        where: the filter, e.g. ``{"VENDOR": "SIEMENS", "FIELD": [1.5, 3]}``; empty keeps all.
        metadata_file: the CSV, only used to name it in errors.

    Returns:
        The matching cases, in input order.

    Raises:
        DataError: when a filter column is not in the CSV (naming the available columns), or
            when nothing matches.
    """
    if not where:
        return list(cases)
    columns = sorted({column for case in cases for column in case.meta})
    for column in where:
        if column not in columns:
            available = ", ".join(columns) if columns else "none: no metadata CSV was found"
            raise DataError(
                metadata_file, f"filter column '{column}' is not in the metadata; "
                f"available columns: {available}"
            )
    missing = sorted({c.subject for c in cases if not c.meta}, key=natural_key)
    if missing:
        message = (
            f"{len(missing)} subject(s) have no row in {Path(metadata_file).name} and are "
            f"skipped by the filter: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
        )
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
    wanted = {column: _allowed(value) for column, value in where.items()}
    kept = [
        case for case in cases
        if case.meta and all(_normalise(case.meta[col]) in ok for col, ok in wanted.items())
    ]
    if not kept:
        seen = {col: sorted({c.meta[col] for c in cases if c.meta}) for col in wanted}
        raise DataError(
            metadata_file, f"filter {dict(where)} matches no case; values present: {seen}"
        )
    return kept


def natural_key(text: str) -> list:
    """Sort key that orders the digit runs of ``text`` as numbers (``"2"`` before ``"10"``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _allowed(value: FilterValue) -> set[str]:
    values = value if isinstance(value, list | tuple | set) else [value]
    return {_normalise(v) for v in values}


def _normalise(value: str | int | float) -> str:
    """``" 1.50 "`` -> ``"1.5"``, ``3.0`` -> ``"3"``, ``" Siemens"`` -> ``"siemens"``."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text.casefold()
    if not math.isfinite(number):
        return text.casefold()
    return str(int(number)) if number.is_integer() else repr(number)
