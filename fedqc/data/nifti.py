"""Read and write NIfTI images and label maps, turning every bad file into a :class:`DataError`.

Images come back as float32 arrays shaped (X, Y, Z): a 2D file (an M&Ms-2 long-axis slice) becomes
(X, Y, 1) and a 4D file whose 4th dimension is 1 is squeezed. Label maps are checked against their
image (shape, affine) and against the M&Ms-2 label values 0..3, after an optional remap for datasets
with another convention. Writes are atomic: a temp file in the same folder replaced into place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from fedqc.core.errors import DataError
from fedqc.core.io import atomic_write
from fedqc.core.types import NUM_CLASSES, FloatArray, LabelArray

AFFINE_ATOL_MM = 1e-3  # label and image affines may differ by float32 rounding, not by a voxel
MAX_DATA_BYTES = 4 * 2**30  # refuse headers that promise more than this: a corrupt dim field
ACDC_REMAP: dict[int, int] = {1: 3, 3: 1}  # ACDC: 1 RV, 2 MYO, 3 LV -> M&Ms-2: 1 LV, 2 MYO, 3 RV
_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True, eq=False)
class Volume:
    """One image on its voxel grid. Treat ``array`` as read-only: copy before changing it.

    Attributes:
        array: float32 voxels shaped (X, Y, Z), scaling (scl_slope/inter) already applied.
        affine: 4x4 voxel-to-world (mm) matrix, nibabel's best affine (sform, else qform).
        header: a copy of the file's header (NIfTI-2 converted to NIfTI-1), used when saving.
        spacing_mm: voxel size along X, Y, Z from pixdim (Z is 1.0 for a 2D file).
        path: the file it was read from.
    """

    array: FloatArray
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing_mm: tuple[float, float, float]
    path: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (X, Y, Z) shape of ``array``."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]


def load_image(path: str | Path) -> Volume:
    """Read a 2D or 3D NIfTI image.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The image as a :class:`Volume` with a float32 (X, Y, Z) array.

    Raises:
        DataError: naming the file, when it is missing, not a NIfTI, corrupt or truncated, 4D with
            more than one frame (a cine), has NaN/Inf voxels, zero/negative/non-finite spacing, a
            non-invertible affine, or is all zero.
    """
    path = Path(path)
    img, raw_header = _open(path)
    data = _read_array(path, img, np.float32)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise DataError(path, f"{bad} of {data.size} voxels are NaN or Inf (or exceed float32)")
    if not np.any(data):
        raise DataError(path, "the image is all zero")
    try:
        header = nib.Nifti1Header.from_header(img.header)
    except Exception as exc:  # NIfTI-2 fields that NIfTI-1 cannot hold
        raise DataError(path, f"header cannot be converted to NIfTI-1 ({exc})") from exc
    return Volume(
        array=data,
        affine=_checked_affine(path, img),
        header=header,
        spacing_mm=_spacing_mm(path, raw_header, img.ndim),
        path=path,
    )


REMAP_HINT = "for another convention set the site's label_remap, e.g. ACDC's {1: 3, 3: 1}"


def load_label(
    path: str | Path, image: Volume, remap: Mapping[int, int] | None = None, hint: str = REMAP_HINT
) -> LabelArray:
    """Read a label map that belongs to ``image``.

    Args:
        path: a ``.nii`` or ``.nii.gz`` label file.
        image: the image it annotates; its shape and affine must match.
        remap: optional ``{file value: M&Ms-2 value}`` applied before the 0..3 check, for datasets
            with another convention, e.g. ACDC (1 RV, 2 MYO, 3 LV) needs ``{1: 3, 3: 1}``
            (:data:`ACDC_REMAP`). Values are swapped simultaneously; unlisted values are kept.
        hint: what the message of values outside 0..3 tells the user to do (a caller without a
            remap option says something else).

    Returns:
        uint8 labels shaped like ``image.array`` with values in 0..3.

    Raises:
        DataError: naming the file, when it is unreadable, its shape or affine differs from the
            image's, or it holds values that are not integers in 0..3 after the remap.
    """
    path = Path(path)
    img, _ = _open(path)
    data = _read_array(path, img, np.float64)
    if data.shape != image.array.shape:
        raise DataError(
            path, f"label shape {data.shape} differs from image shape {image.array.shape} "
            f"({image.path.name})"
        )
    affine = _checked_affine(path, img)
    if not np.allclose(affine, image.affine, rtol=0.0, atol=AFFINE_ATOL_MM):
        worst = float(np.max(np.abs(affine - image.affine)))
        raise DataError(
            path, f"label affine differs from the image's ({image.path.name}) by up to "
            f"{worst:.4g} mm (tolerance {AFFINE_ATOL_MM} mm); they are not on the same grid"
        )
    finite = np.isfinite(data) & (np.abs(data) < 2**31)
    fractional = finite & (data != np.round(data))
    if not finite.all() or fractional.any():
        odd = np.unique(data[~finite | fractional])
        raise DataError(path, f"label values must be integers; found {_list_values(odd)}")
    values = data.astype(np.int64)
    if remap:
        values = apply_remap(values, remap)
    wrong = np.unique(values[(values < 0) | (values >= NUM_CLASSES)])
    if wrong.size:
        raise DataError(
            path, f"label values {_list_values(wrong)} are outside 0..{NUM_CLASSES - 1} "
            f"(0 background, 1 LV, 2 MYO, 3 RV); {hint}"
        )
    return values.astype(np.uint8)


def apply_remap(values: np.ndarray, remap: Mapping[int, int]) -> np.ndarray:
    """Replace label values simultaneously (so ``{1: 3, 3: 1}`` swaps); unlisted values stay.

    Args:
        values: integer label array.
        remap: ``{old value: new value}``.

    Returns:
        A new int64 array.
    """
    out = np.array(values, dtype=np.int64, copy=True)
    for old, new in remap.items():
        out[values == int(old)] = int(new)
    return out


def save_label(path: str | Path, labels: np.ndarray, reference: Volume) -> Path:
    """Write a uint8 label map that overlays ``reference`` in any viewer.

    The reference's header is copied (sform, qform and their codes kept), the datatype set to
    uint8, scaling reset and cal_min/cal_max set to 0..3. The write is atomic.

    Args:
        path: destination ending in ``.nii`` or ``.nii.gz``; its folder must exist.
        labels: integer labels shaped like ``reference.array``, values in 0..255.
        reference: the image the labels belong to.

    Returns:
        The written path.

    Raises:
        ValueError: if ``labels`` does not match the reference's shape or is not integer-valued.
        DataError: if ``path`` has a wrong suffix or cannot be written.
    """
    labels = np.asarray(labels)
    if labels.shape != reference.array.shape:
        raise ValueError(f"labels shape {labels.shape} != reference shape {reference.array.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and not np.all(labels == np.round(labels)):
        raise ValueError("labels must be integer-valued")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must lie in 0..255 to be stored as uint8")
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header["cal_min"], header["cal_max"] = 0, NUM_CLASSES - 1
    return _write(Path(path), labels.astype(np.uint8), header, reference)


def save_image(path: str | Path, array: np.ndarray, reference: Volume) -> Path:
    """Write a float32 image (e.g. a probability map) on ``reference``'s grid, atomically.

    Args:
        path: destination ending in ``.nii`` or ``.nii.gz``; its folder must exist.
        array: values shaped like ``reference.array``.
        reference: the image whose affine and header are reused.

    Returns:
        The written path.

    Raises:
        ValueError: if ``array`` does not match the reference's shape.
        DataError: if ``path`` has a wrong suffix or cannot be written.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.shape != reference.array.shape:
        raise ValueError(f"array shape {array.shape} != reference shape {reference.array.shape}")
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    header["cal_min"], header["cal_max"] = 0, 0
    return _write(Path(path), array, header, reference)


def _open(path: Path) -> tuple[nib.Nifti1Image, nib.Nifti1Header]:
    """Open ``path`` lazily; also return its header as stored (nibabel silently fixes pixdim)."""
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a regular file")
    if not path.name.endswith(_SUFFIXES):
        raise DataError(path, "not a NIfTI file name (expected .nii or .nii.gz)")
    try:  # nibabel raises a zoo of types here (ImageFileError, zlib.error, EOFError, OSError, ...)
        img = nib.load(path, mmap=False)  # read into memory: the file may be replaced later
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise DataError(path, f"not a NIfTI image (nibabel read a {type(img).__name__})")
        with ImageOpener(path) as fobj:
            raw_header = type(img.header).from_fileobj(fobj, check=False)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(path, f"unreadable or corrupt NIfTI ({type(exc).__name__}: {exc})") from exc
    return img, raw_header


def _read_array(path: Path, img: nib.Nifti1Image, dtype: type) -> np.ndarray:
    """Read voxels as ``dtype`` and bring them to (X, Y, Z)."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 2:
        raise DataError(path, f"image is {len(shape)}D with shape {shape}; 2D or 3D was expected")
    if any(n == 0 for n in shape):
        raise DataError(path, f"image has an empty dimension, shape {shape}")
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise DataError(
            path, f"image is {len(shape)}D with shape {shape} (a cine?); 3D was expected"
        )
    n_bytes = int(np.prod(shape, dtype=np.float64)) * img.get_data_dtype().itemsize
    if n_bytes > MAX_DATA_BYTES:
        raise DataError(path, f"header promises {n_bytes} bytes of voxels; corrupt dimensions?")
    if path.name.endswith(".nii"):
        expected = int(img.header.get_data_offset()) + n_bytes
        if path.stat().st_size < expected:
            raise DataError(
                path, f"truncated: {path.stat().st_size} bytes, header needs {expected}"
            )
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow shows up as Inf, reported
            data = np.asarray(img.get_fdata(dtype=dtype))
    except Exception as exc:
        raise DataError(path, f"voxel data unreadable ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    return data.reshape(shape[:3] if len(shape) >= 3 else (*shape, 1))


def _spacing_mm(path: Path, raw_header: nib.Nifti1Header, ndim: int) -> tuple[float, float, float]:
    """Voxel size from the stored pixdim; a 2D file's missing Z spacing defaults to 1 mm."""
    pixdim = np.asarray(raw_header["pixdim"], dtype=np.float64)[1:4]
    used = pixdim[: min(ndim, 3)]
    if not np.all(np.isfinite(used)) or np.any(used <= 0):
        raise DataError(
            path, f"voxel spacing (pixdim) {used.tolist()} must be finite and positive"
        )
    if ndim == 2:
        z = pixdim[2]
        pixdim[2] = z if np.isfinite(z) and z > 0 else 1.0
    return float(pixdim[0]), float(pixdim[1]), float(pixdim[2])


def _checked_affine(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, "the voxel-to-world affine is not finite and invertible")
    return affine


def _write(path: Path, data: np.ndarray, header: nib.Nifti1Header, reference: Volume) -> Path:
    """Write atomically on the reference grid, in the reference file's original dimensionality."""
    if not path.name.endswith(_SUFFIXES):
        raise DataError(path, "output must end with .nii or .nii.gz")
    original_shape = tuple(int(n) for n in reference.header.get_data_shape())
    if int(np.prod(original_shape)) == data.size:
        data = data.reshape(original_shape)  # a 2D reference stays 2D, a (X,Y,Z,1) stays 4D
    img = nib.Nifti1Image(data, reference.affine, header=header)
    sform, sform_code = reference.header.get_sform(coded=True)
    qform, qform_code = reference.header.get_qform(coded=True)
    img.set_sform(reference.affine if sform is None else sform, code=int(sform_code))
    img.set_qform(reference.affine if qform is None else qform, code=int(qform_code))
    img.header.set_slope_inter(1.0, 0.0)
    try:
        atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
    except Exception as exc:
        raise DataError(path, f"could not write ({type(exc).__name__}: {exc})") from exc
    return path


def _list_values(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return f"[{shown}{', ...' if values.size > limit else ''}]"
