"""NIfTI volumes <-> napari layers: pure geometry, no Qt and no napari import.

Axis convention. napari draws the last two axes of a layer as screen rows (down) and
columns (right) and slides through the first. A NIfTI voxel grid may be stored in any
orientation (LIA, RAS, oblique...), and napari cannot slice a volume whose affine mixes
the sliced axis into the displayed ones. So the reader reorients the voxels (a lossless
transpose and flip, a numpy view) so that array axes run Inferior, Posterior and Left,
and napari's world axes are (-z, -y, -x) of scanner RAS mm. That choice gives

* the radiological axial view that scanners and ITK-SNAP show by default (anterior up,
  the patient's right on the screen's left), an upright sagittal view after napari's
  "roll" and an upright coronal one after two rolls and a "transpose", and
* a right-handed world (det +1), so 3D renderings are not mirror images.

Any residual obliquity goes into the layer's ``rotate`` and ``shear``. The native affine
and header stay in ``layer.metadata`` ("affine", "header"), so the writer puts voxels
back on the file's own grid, bit for bit. napari-nifti (0.0.20) keeps an affine under the
same key, for its voxels with their axes reversed; :func:`resolve` reads both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from napari_meshchop.imaging.nifti import check_volume

DISPLAY_AXES = ("I", "P", "L")  # where array axes 0, 1, 2 of a layer point
# napari world = RAS_TO_WORLD @ RAS: (inferior, posterior, left) in mm.
RAS_TO_WORLD = np.array([[0.0, 0, -1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]])
WORLD_TO_RAS = np.linalg.inv(RAS_TO_WORLD)

# Length units napari layers may carry, in mm; "pixel" (napari's default) means unknown.
_MM_PER_UNIT = {"millimeter": 1.0, "mm": 1.0, "micrometer": 1e-3, "um": 1e-3,
                "centimeter": 10.0, "meter": 1000.0, "nanometer": 1e-6}


@dataclass
class Geometry:
    """Where a layer's voxels lie in scanner RAS mm, and how to undo the reader's reorientation."""

    affine: np.ndarray  # layer array voxel -> RAS mm
    native_affine: np.ndarray | None = None  # of the voxel order in the file (metadata)
    to_native: np.ndarray | None = None  # nibabel ornt: layer array -> native voxel order
    notes: list[str] = field(default_factory=list)

    @property
    def voxel_size(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


# ------------------------------------------------------------------ NIfTI -> layer


def layer_kwargs(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict]:
    """The reoriented voxels (a view) and the napari transform keywords for them."""
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(DISPLAY_AXES))
    view = apply_orientation(data, ornt)
    layer_affine = np.asarray(affine, dtype=float) @ inv_ornt_aff(ornt, data.shape)
    return view, decompose(RAS_TO_WORLD @ layer_affine)


def decompose(data_to_world: np.ndarray) -> dict:
    """napari's scale, translate, rotate and shear for a 4x4 data -> world matrix.

    napari composes ``rotate @ shear @ diag(scale)`` (shear upper triangular with a unit
    diagonal), which is a QR decomposition with a positive diagonal.
    """
    matrix = np.asarray(data_to_world, dtype=float)
    q, r = np.linalg.qr(matrix[:3, :3])
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    q, r = q * signs, signs[:, None] * r
    if np.linalg.det(q) < 0:  # a reflection is left for napari as one negative scale
        q[:, -1] *= -1
        r[-1] *= -1
    scale = np.diag(r).copy()
    shear = r / scale[None, :]
    return {"scale": scale, "translate": matrix[:3, 3].copy(),
            "rotate": _snap(q), "shear": _snap(shear)}


def _snap(m: np.ndarray) -> np.ndarray:
    """Round-off from the QR to exact 0 and 1, so a plain grid shows no rotation."""
    out = m.copy()
    out[np.abs(out) < 1e-12] = 0.0
    out[np.abs(out - 1) < 1e-12] = 1.0
    return out


# ------------------------------------------------------------------ layer -> NIfTI


def data_to_world(scale: Sequence[float], translate: Sequence[float],
                  rotate: np.ndarray | None = None, shear: np.ndarray | None = None,
                  affine: np.ndarray | None = None) -> np.ndarray:
    """A napari layer's 4x4 data -> world matrix from its transform attributes (3D)."""
    rotate = np.eye(3) if rotate is None else np.asarray(rotate, dtype=float)
    shear = np.eye(3) if shear is None else np.asarray(shear, dtype=float)
    if shear.ndim == 1:  # napari's upper-triangular values, row by row
        values, shear = shear, np.eye(3)
        shear[np.triu_indices(3, 1)] = values
    inner = np.eye(4)
    inner[:3, :3] = rotate @ shear @ np.diag(np.asarray(scale, dtype=float))
    inner[:3, 3] = translate
    outer = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    return outer @ inner


def resolve(shape: Sequence[int], world: np.ndarray, metadata: Mapping | None = None,
            units: Sequence[str] | None = None, name: str = "layer") -> Geometry:
    """Where a 3D layer's voxels lie in RAS mm, from its metadata or else its transform.

    ``world`` is the layer's data -> world matrix (see :func:`data_to_world`), read in
    this module's display convention; a layer without NIfTI metadata gets a note saying
    what was assumed.
    """
    shape = tuple(int(s) for s in shape)
    factor = _mm_per_unit(units)
    notes = [] if factor is not None else [_assumed(name, world)]
    shown = WORLD_TO_RAS @ np.diag([factor or 1.0] * 3 + [1.0]) @ np.asarray(world, float)
    return _from_metadata(shape, shown, metadata or {}) or Geometry(shown, notes=notes)


def _from_metadata(shape: tuple, shown: np.ndarray, metadata: Mapping) -> Geometry | None:
    """The exact grid that a reader left in ``metadata["affine"]``, when it fits the layer.

    Ours: the file's affine, of voxels the reader reoriented to what the transform
    shows; used while the transform still agrees. napari-nifti (medvol keys): the affine
    of the voxels with their axes reversed, as its writer reads it back; its display
    flips axes, so only voxel sizes can be checked against the transform.
    """
    native = _affine_from(metadata)
    if native is None:
        return None
    if "coordinate_system" in metadata:
        to_native = np.array([[2.0, 1], [1, 1], [0, 1]])  # axis i <-> 2 - i, both ways
        layer_affine = native @ inv_ornt_aff(to_native, shape[::-1])
        if not np.allclose(_zooms(layer_affine), _zooms(shown), rtol=1e-4):
            return None
    else:
        to_layer = ornt_transform(io_orientation(native), io_orientation(shown))
        native_shape = tuple(np.array(shape)[to_layer[:, 0].astype(int)])
        layer_affine = native @ inv_ornt_aff(to_layer, native_shape)
        if not np.allclose(layer_affine, shown, atol=1e-4):
            return None
        to_native = ornt_transform(io_orientation(shown), io_orientation(native))
    return Geometry(layer_affine, native, to_native)


def to_nifti(data: np.ndarray, geometry: Geometry, name: str = "layer") -> nib.Nifti1Image:
    """A checked float32 NIfTI image of a layer's voxels, for the segmentation core."""
    volume = check_volume(np.asarray(data), path=f"layer {name!r}")
    img = nib.Nifti1Image(volume, geometry.affine)
    img.header.set_xyzt_units("mm")
    return img


def to_native(data: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """The layer's voxels in the file's own order with the file's affine, when known."""
    if geometry.to_native is None:
        return np.asarray(data), geometry.affine
    return apply_orientation(np.asarray(data), geometry.to_native), geometry.native_affine


def _affine_from(metadata: Mapping | None) -> np.ndarray | None:
    value = (metadata or {}).get("affine")
    try:
        affine = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return None
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return None
    return affine


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _mm_per_unit(units: Sequence[str] | None) -> float | None:
    """mm per world unit when the layer's units say so; None for pixels or a mix."""
    if not units:
        return None
    factors = {_MM_PER_UNIT.get(str(u).strip().lower()) for u in units}
    return factors.pop() if len(factors) == 1 and None not in factors else None


def _assumed(name: str, world: np.ndarray) -> str:
    size = " x ".join(f"{z:g}" for z in np.round(_zooms(world), 4))
    return (f"'{name}' has no NIfTI geometry: assumed voxels of {size} mm (the layer's "
            "scale) and napari's radiological axial layout (anterior up, the patient's "
            "right on the left).")
