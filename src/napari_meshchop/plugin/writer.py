"""Writer contributions: Labels and Image layers to NIfTI, on the source scan's grid.

A layer that came from a NIfTI file (its metadata holds the file's affine) goes back to
the file's own voxel order, affine and header, so a mask drawn or segmented in napari
opens aligned in FSLeyes, ITK-SNAP or MRIcroGL. Any other layer is written in its own
voxel order with the affine its napari transform implies (see layers.py).
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from napari_meshchop.errors import MeshchopError
from napari_meshchop.imaging.nifti import is_nifti_path, save_atomic
from napari_meshchop.plugin import layers

NIFTI_INTENT_LABEL = 1002
# Types NIfTI-1 stores natively; anything else is converted.
_NIFTI_TYPES = {np.dtype(t) for t in (np.uint8, np.int16, np.int32, np.float32, np.float64,
                                     np.int8, np.uint16, np.uint32, np.int64, np.uint64)}


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    values = np.asarray(data)
    if values.dtype.kind not in "biu":
        raise MeshchopError(f"{path}: labels must be integers, not {values.dtype}")
    return [_write(path, values.astype(_label_dtype(values), copy=False), meta, labels=True)]


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    values = np.asarray(data)
    if meta.get("rgb"):
        raise MeshchopError(f"{path}: RGB layers cannot be written as a NIfTI volume")
    if values.dtype not in _NIFTI_TYPES:
        values = values.astype(np.uint8 if values.dtype == bool else np.float32)
    return [_write(path, values, meta, labels=False)]


def _write(path: str, data: np.ndarray, meta: dict, labels: bool) -> str:
    if not is_nifti_path(path):
        path = f"{path}.nii.gz"
    if data.ndim != 3:
        raise MeshchopError(f"{path}: a {data.ndim}D layer cannot be written; NIfTI "
                            "export here is for 3D volumes")
    world = layers.data_to_world(meta["scale"], meta["translate"], meta.get("rotate"),
                                 meta.get("shear"), meta.get("affine"))
    metadata = meta.get("metadata") or {}
    geometry = layers.resolve(data.shape, world, metadata, _unit_names(meta.get("units")))
    voxels, affine = layers.to_native(data, geometry)
    header = metadata.get("header") if geometry.to_native is not None else None
    save_atomic(_image(np.ascontiguousarray(voxels), affine, header, labels), path)
    return path


def _image(data: np.ndarray, affine: np.ndarray, header, labels: bool) -> nib.Nifti1Image:
    """A NIfTI-1 image keeping the source header's codes, units and description."""
    source = header if isinstance(header, nib.Nifti1Header) else None
    img = nib.Nifti1Image(data, affine, header=source.copy() if source is not None else None)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_slope_inter(1.0, 0.0)  # voxels are written as they are, never rescaled
    if source is None:  # scanner space, as the core's masks
        hdr.set_sform(affine, code=1)
        hdr.set_qform(affine, code=1)
        hdr.set_xyzt_units("mm")
    else:  # the source's own codes: scanner, aligned, MNI... or unset
        hdr.set_sform(affine, code=int(source["sform_code"]))
        hdr.set_qform(affine, code=int(source["qform_code"]))
    if labels:
        hdr.set_intent("label")
        hdr["cal_min"], hdr["cal_max"] = 0, float(data.max()) if data.size else 0
        hdr["descrip"] = b"napari-meshchop labels"
    return img


def _label_dtype(values: np.ndarray) -> np.dtype:
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.uint8, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _unit_names(units) -> list[str] | None:
    if units is None:
        return None
    if isinstance(units, str):
        return [units] * 3
    return [str(u) for u in units]
