"""Reading and writing NIfTI volumes, with one clear error per kind of bad input."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_meshchop import files
from napari_meshchop.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load one 3D MRI volume, fully read and checked, as float32 in memory.

    nibabel opens lazily and only fails when the voxels are read (a truncated
    gzip, for instance), so the data is read here, where the file can be named.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises several types for foreign files
        raise InputError(path, f"not a readable NIfTI image ({_reason(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"is a {type(img).__name__}, not a NIfTI image")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise InputError(path, f"file is truncated or corrupt ({_reason(exc)})") from None
    data = check_volume(data, path)
    out = nib.Nifti1Image(data, img.affine, header=_header_3d(img, data))
    return out


def load_mask(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 3D label volume (an empty one too) and its affine; InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a file")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for foreign or truncated files
        raise InputError(path, f"not a readable NIfTI mask ({_reason(exc)})") from None
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise InputError(path, f"has shape {data.shape}; a 3D mask is needed")
    if not np.isfinite(data).all():
        raise InputError(path, "holds NaN or infinite voxels")
    return data, np.asarray(img.affine, dtype=float)


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


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def save_mask(mask: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 label volume on ``affine`` atomically (temp file, then rename)."""
    img = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_slope_inter(1, 0)
    return save_atomic(img, path)


def save_atomic(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Write ``img`` to ``path`` (.nii or .nii.gz) so that it appears only when complete."""
    path = Path(path)
    if not is_nifti_path(path):
        raise InputError(path, "output must end in .nii or .nii.gz")
    data = img.to_bytes()
    if str(path).lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return files.write_bytes(path, data)
