"""The one preprocessing entry point: MRI volume -> network input, and back.

A checkpoint names the preprocessing it was trained with (a :class:`PreprocessSpec`);
inference applies exactly that one. Three are known:

``conform``
    FreeSurfer's ``mri_convert --conform`` (256^3, 1 mm, LIA, robust 0-255 with the
    upper bound at the 99.9th percentile), then divided by 255. The paper's recipe.
``ras-minmax``
    What arc-meshchop trains with: reorient to RAS+, zoom to 1 mm (scipy's
    corner-aligned ``zoom``), centre crop or pad to 256^3 in voxel space, then
    min-max scale the whole volume to [0, 1].
``brainchop``
    Exactly what brainchop's command line feeds a model (so that a model trained on it
    runs there unchanged): niimath's ``-conform`` (``conform`` with niimath's upper
    quantile, 0.98), then the uint8 volume's 2% and 98% quantiles map to 0 and 1, clipped.

All are a resampling onto a *network grid* (an affine and a shape) plus an
intensity rule, so masks follow the image onto the same grid and predictions go
back to the input's grid through the same affines.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from napari_meshchop.imaging import conform as _conform
from napari_meshchop.imaging.geometry import resample
from napari_meshchop.imaging.spec import CONFORMED, KNOWN, PreprocessSpec  # noqa: F401 - this module's API

# brainchop's command line (0.2.x) normalises every conformed volume this way, whatever the
# model's folder says: numpy's (linearly interpolated) 2% and 98% quantiles of the uint8
# volume map to 0 and 1, with a small constant in the divisor, and the rest is clipped.
QUANTILES = (0.02, 0.98)
QUANTILE_EPS = 1e-3


@dataclass
class Prepared:
    """A volume on the network grid, with what is needed to map results back."""

    volume: np.ndarray  # float32 in [0, 1], shape spec.shape
    affine: np.ndarray  # voxel -> world of the network grid
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]


def network_grid(affine: np.ndarray, shape: tuple[int, ...], spec: PreprocessSpec) -> np.ndarray:
    """The world affine of the grid the network sees for an input on ``affine``/``shape``."""
    if spec.name in CONFORMED:
        return _conform.conformed_affine(affine, shape[:3])
    # ras-minmax: the RAS+ reorientation is a voxel permutation and flip; zoom aligns
    # the first and last voxel centres; the crop or pad then shifts by whole voxels.
    ornt = nib.orientations.io_orientation(affine)
    ras_shape = np.array(shape[:3])[ornt[:, 0].astype(int).argsort()]
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape[:3])
    spacing = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    zoomed = np.round(ras_shape * spacing / spec.voxel_size).astype(int)
    step = (ras_shape - 1) / np.maximum(zoomed - 1, 1)
    target = np.array(spec.shape)
    # Where crop starts (>0) or where the data lands after padding (<0), in zoomed voxels.
    start = np.where(zoomed > target, (zoomed - target) // 2, -((target - zoomed) // 2))
    zoom_to_source = np.diag([*step, 1.0])
    crop = np.eye(4)
    crop[:3, 3] = start
    return ras_affine @ zoom_to_source @ crop


def prepare(img: nib.Nifti1Image, spec: PreprocessSpec) -> Prepared:
    """Resample ``img`` onto the network grid and scale it to [0, 1]."""
    if spec.name in CONFORMED:
        f_high = _conform.NIIMATH_F_HIGH if spec.name == "brainchop" else None
        conformed = _conform.conform(img, f_high=f_high)
        image = np.asarray(conformed.dataobj)
        volume = (quantile_clip(image) if spec.name == "brainchop"
                  else np.divide(image, np.float32(255), dtype=np.float32))
        return Prepared(volume, conformed.affine, np.asarray(img.affine), tuple(img.shape[:3]))
    grid = network_grid(img.affine, img.shape, spec)
    volume = resample(np.asarray(img.dataobj, dtype=np.float32), img.affine, grid,
                      spec.shape, order=1)
    lo, hi = float(volume.min()), float(volume.max())
    volume -= lo
    volume /= max(hi - lo, 1e-8)
    return Prepared(volume, grid, np.asarray(img.affine), tuple(img.shape[:3]))


def quantile_clip(image: np.ndarray) -> np.ndarray:
    """brainchop's intensity rule on a conformed uint8 volume: float32 in [0, 1]."""
    lo, hi = (np.float32(q) for q in uint8_quantiles(image, QUANTILES))
    volume = image.astype(np.float32)
    volume -= lo
    volume /= hi - lo + np.float32(QUANTILE_EPS)
    return np.clip(volume, 0.0, 1.0, out=volume)


def uint8_quantiles(image: np.ndarray, qs) -> list[float]:
    """``numpy.quantile(image, qs)`` (linear interpolation) of a uint8 volume, read off its
    histogram instead of sorting 16 million voxels."""
    cumulative = np.cumsum(np.bincount(np.asarray(image, dtype=np.uint8).ravel(), minlength=256))
    n = int(cumulative[-1])
    out = []
    for q in qs:
        h = (n - 1) * q
        rank = int(np.floor(h))
        # The value at sorted position r is the first one whose cumulative count exceeds r.
        below, above = np.searchsorted(cumulative, [rank, min(rank + 1, n - 1)], side="right")
        out.append(float(below) + (h - rank) * float(above - below))
    return out


def prepare_mask(mask: nib.Nifti1Image, like: nib.Nifti1Image, spec: PreprocessSpec) -> np.ndarray:
    """A lesion mask onto the network grid of its image ``like``: > 0, then nearest neighbour.

    Binarising first keeps a lesion stored with an odd scl_slope (1/255, say) intact.
    """
    grid = network_grid(like.affine, like.shape, spec)
    lesion = (np.asarray(mask.dataobj) > 0).astype(np.uint8)
    return resample(lesion, mask.affine, grid, spec.shape, order=0, output=np.uint8)


def to_source(values: np.ndarray, prepared: Prepared, order: int = 1) -> np.ndarray:
    """Bring a network-grid volume (a lesion probability) back onto the input's grid."""
    return resample(values, prepared.affine, prepared.source_affine, prepared.source_shape,
                    order=order)
