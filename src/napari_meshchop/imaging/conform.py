"""FreeSurfer's ``mri_convert --conform``: 256^3 voxels of 1 mm, LIA, uint8 0..255.

The grid and the robust intensity range follow FreeSurfer as FastSurfer's conform.py and
niimath's ``-conform`` re-implement it; niimath is the oracle in the tests.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from napari_meshchop.imaging.geometry import resample

CONFORMED_SHAPE = (256, 256, 256)

# Upper quantile of the robust range. FreeSurfer (mri_convert reports fhi=0.999) and
# FastSurfer use 0.999; niimath's -conform deliberately uses 0.98 instead.
F_HIGH = 0.999
NIIMATH_F_HIGH = 0.98

# Voxel axes -> world: i runs to Left, j to Inferior, k to Anterior (1 mm each).
_LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def conformed_affine(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """4x4 LIA 1 mm affine of the 256^3 grid centred on the input's centre."""
    # FreeSurfer's c_ras is the world position of voxel N/2 (not (N-1)/2) on each axis,
    # and it lands on voxel 256/2 = 128 of the conformed grid.
    affine = np.asarray(affine, dtype=np.float64)
    centre = affine[:3, :3] @ (np.asarray(shape[:3], dtype=np.float64) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = _LIA
    out[:3, 3] = centre - _LIA @ (np.asarray(CONFORMED_SHAPE, dtype=np.float64) / 2)
    return out


def robust_range(
    data: np.ndarray, f_low: float = 0.0, f_high: float = 0.999
) -> tuple[float, float]:
    """Intensity range that leaves out the darkest ``f_low`` of all voxels and the
    brightest ``1 - f_high`` of the non-zero voxels, read off a 1000-bin histogram."""
    data = np.asarray(data)
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo or (f_low <= 0.0 and f_high >= 1.0):
        return lo, hi
    nbins = 1000
    width = (hi - lo) / nbins
    counts = np.cumsum(np.histogram(data, bins=nbins, range=(lo, hi))[0])
    # Lower limit: the first bin whose cumulative count reaches the f_low quantile.
    low_bin = int(np.searchsorted(counts, int(f_low * data.size)))
    # Upper limit as FastSurfer (and niimath) compute it: the quantile is taken over the
    # non-zero voxels only, and the limit is the lower edge of the bin *below* the one
    # holding that quantile (FastSurfer's "idx - 2" on its zero-prefixed cumsum).
    nonzero = np.count_nonzero(np.abs(data) >= 1e-15)
    nth = data.size - int((1.0 - f_high) * nonzero)
    high_bin = max(int(np.searchsorted(counts, nth)) - 1, 0)
    # FastSurfer measures the upper limit from the raised lower limit; we measure both
    # from the data's minimum (the same thing whenever f_low is 0, as in conform).
    return lo + low_bin * width, lo + high_bin * width


def conform(img: nib.spatialimages.SpatialImage, order: int = 1,
            f_high: float | None = None) -> nib.Nifti1Image:
    """uint8 0..255 conformed image (header with the conformed affine, qform and sform set).

    ``f_high`` is the robust range's upper quantile: FreeSurfer's :data:`F_HIGH` unless
    given (:data:`NIIMATH_F_HIGH` for niimath's ``-conform``)."""
    if len(img.shape) != 3:
        raise ValueError(f"conform needs a 3D image, got shape {img.shape}")
    dst = conformed_affine(img.affine, img.shape)
    # Every input gets the robust scaling, a uint8 one too (FreeSurfer would leave a uchar
    # volume alone): the same image stored as uint8, int16 or float must conform alike.
    data = np.asarray(img.dataobj, dtype=np.float32)  # scl_slope/inter applied
    # A few negative voxels (under 2%: interpolation ringing, noise) must not set the
    # black level; niimath reads them as 0. More than that is signal and is kept.
    if 0 < np.count_nonzero(data < 0) < 0.02 * data.size:
        data = np.maximum(data, np.float32(0))
    lo, hi = robust_range(data, 0.0, F_HIGH if f_high is None else f_high)
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    # Scale and clip on the input grid, before resampling, as niimath does (FastSurfer
    # clips after resampling; the two differ only next to clipped voxels).
    scaled = data - np.float32(lo)
    scaled *= np.float32(scale)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    del data
    out = resample(scaled, img.affine, dst, CONFORMED_SHAPE, order=order)
    # Round half up, as niimath's float -> uint8 conversion does (all values are >= 0).
    out += 0.5
    np.clip(out, 0.0, 255.0, out=out)
    return _nifti(out.astype(np.uint8), dst, img)


def conform_mask(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """Lesion mask onto the conformed grid: nearest neighbour, binarised with > 0
    (some real masks carry an odd scl_slope), uint8 {0,1}."""
    # Binarise the scaled values first, so a slope such as 1/255 cannot round a lesion away.
    mask = (np.asarray(img.dataobj) > 0).astype(np.uint8)
    dst = conformed_affine(img.affine, img.shape)
    out = resample(mask, img.affine, dst, CONFORMED_SHAPE, order=0, output=np.uint8)
    return _nifti(out, dst, img)


def _nifti(data: np.ndarray, affine: np.ndarray, like) -> nib.Nifti1Image:
    """A NIfTI-1 image whose qform and sform both hold ``affine``, keeping the input's
    world-space code (scanner, aligned, MNI...) where it has one."""
    code = 1
    if isinstance(like, nib.Nifti1Image):
        code = int(like.header["sform_code"]) or int(like.header["qform_code"]) or 1
    out = nib.Nifti1Image(data, affine)
    # Through the header, so that out.affine stays the exact float64 grid.
    out.header.set_sform(affine, code=code)
    out.header.set_qform(affine, code=code)
    out.header.set_data_dtype(np.uint8)
    out.header.set_xyzt_units("mm")
    return out
