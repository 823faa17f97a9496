"""Reading and writing NIfTI volumes, with one clear error per kind of bad input."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_meshchop import files
from napari_meshchop.errors import InputError, reason

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAGIC = b"\x1f\x8b"


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load one 3D MRI volume, fully read and checked, as float32 in memory.

    nibabel opens lazily and only fails when the voxels are read (a truncated
    gzip, for instance), so the data is read here, where the file can be named.
    """
    path = Path(path)
    img = _open(path)
    data = check_volume(_voxels(img, path, np.float32), path)
    out = nib.Nifti1Image(data, img.affine, header=_header_3d(img, data))
    return out


def load_mask(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load one 3D label volume (a lesion mask; an empty one too), fully read and checked,
    its voxels in memory as the header scales them (a mask stored as 1 with scl_slope 1/255
    stays > 0); InputError naming the file."""
    path = Path(path)
    img = _open(path)
    data = _voxels(img, path)
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"has shape {shape}; a mask must be one 3D volume")
    return nib.Nifti1Image(data, img.affine)


def _open(path: Path):
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises several types for foreign files
        raise InputError(path, f"not a readable NIfTI image ({reason(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"is a {type(img).__name__}, not a NIfTI image")
    return img


def _voxels(img, path: Path, dtype=None) -> np.ndarray:
    """The voxels, read now: nibabel opens lazily and only fails when they are read (a
    truncated gzip, plain bytes under a .nii.gz name), so they are read here, where the
    file can be named."""
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise InputError(path, f"file is truncated or corrupt ({reason(exc)})") from None


def as_named(data: bytes, name: str | os.PathLike) -> bytes:
    """NIfTI file bytes as a file called ``name`` must hold them to be read by its name:
    gzipped for ``.gz``, plain otherwise, whichever they are now (their first bytes tell;
    the name they came with does not)."""
    gzipped = data[:2] == GZIP_MAGIC
    if str(name).lower().endswith(".gz"):
        return data if gzipped else gzip.compress(data, compresslevel=6, mtime=0)
    return gzip.decompress(data) if gzipped else data


def naming_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be read by its own name (gzipped or not, against its ``.gz``
    suffix), or None when its name says what it is."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == GZIP_MAGIC
    if gzipped == str(path).lower().endswith(".gz"):
        return None
    return ("is gzipped but its name does not end in .gz" if gzipped
            else "is not gzipped but its name ends in .gz")


def check_volume(data: np.ndarray, path: str | os.PathLike | None = None) -> np.ndarray:
    """Return ``data`` as a 3D float32 array, or raise InputError saying what is wrong."""
    shape = data.shape
    if data.ndim == 4 and shape[3] == 1:
        data = data[..., 0]
    elif data.ndim > 3:
        if all(s == 1 for s in shape[3:]):
            data = data.reshape(shape[:3])
        else:
            raise InputError(path, f"has {int(np.prod(shape[3:]))} volumes (shape {shape}); "
                             "give a single 3D volume")
    if data.ndim < 3 or min(data.shape) < 2:
        raise InputError(path, f"is 2D or thinner (shape {shape}); a 3D volume is needed")
    finite = np.isfinite(data)
    if not finite.all():
        bad = data.size - int(finite.sum())
        raise InputError(path, f"holds {bad} NaN or infinite voxels")
    if data.max() == data.min():
        raise InputError(path, f"is blank: every voxel is {float(data.min()):g}")
    return np.asarray(data, dtype=np.float32)


def _header_3d(img, data) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    zooms = img.header.get_zooms()[:3]
    hdr.set_zooms(zooms)
    hdr.set_xyzt_units(*img.header.get_xyzt_units())
    return hdr



def save_mask(mask: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 label volume on ``affine`` atomically (temp file, then rename)."""
    img = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_slope_inter(1, 0)
    return save_atomic(img, path)


def save_probability(values: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write values in [0, 1] (a probability) atomically as uint8 with scl_slope 1/255:
    readers get the value back within 1/510, and an empty background compresses away."""
    levels = np.clip(np.rint(np.asarray(values, dtype=np.float32) * 255), 0, 255)
    img = nib.Nifti1Image(levels.astype(np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_slope_inter(1 / 255, 0)
    return save_atomic(img, path)


def save_atomic(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Write ``img`` to ``path`` (.nii or .nii.gz) so that it appears only when complete."""
    path = Path(path)
    if not is_nifti_path(path):
        raise InputError(path, "output must end in .nii or .nii.gz")
    return files.write_bytes(path, as_named(img.to_bytes(), path))
