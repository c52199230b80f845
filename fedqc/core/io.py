"""The only way fedqc writes a file: atomically, durably, owner-only.

Files under a run or a site's work dir hold patient-derived data (predictions, QC reports,
fences, models trained on patients). Every writer goes through :func:`atomic_write`:

1. a uniquely named temporary file in the destination's folder, created 0600;
2. the content written (bytes, or a callable that writes a path or a binary stream);
3. ``fsync`` of the file, ``rename`` over the destination, ``fsync`` of the folder.

A reader never sees a half-written file, an interrupted writer leaves the previous version
intact, two writers never share a temporary name, and the file is private whatever the umask.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

Writer = bytes | str | Callable[[Path], Any]


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by its owner only."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def atomic_write(path: str | Path, data: Writer) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename), mode 0600.

    Args:
        path: the destination; its folder is created.
        data: bytes, text (UTF-8), or a callable given the temporary path to write (it keeps the
            destination's suffixes, e.g. ``.nii.gz``, so format-sniffing writers work).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o600)
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
            os.chmod(tmp, 0o600)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            payload = data.encode() if isinstance(data, str) else data
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_stream(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """:func:`atomic_write` for writers that take a binary stream (``torch.save``, ``np.savez``)."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    return atomic_write(path, to_file)


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (non-JSON values as their ``str``)."""
    return atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of equal keys as CSV text (header from the first row; empty text without rows)."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], compressed: bool = False) -> Path:
    """Atomically write named arrays as ``.npz`` (names kept verbatim, no pickles)."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write(path, buffer.getvalue())


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays written by :func:`save_arrays` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
