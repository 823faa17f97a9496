"""Reader contribution: a NIfTI volume as a napari layer in physical space (see layers.py).

Which reader napari uses. napari's own reader (imageio) also lists ``*.nii`` and
``*.nii.gz`` but fails on them, and napari-nifti, when installed, claims every ``*.gz``. With
several readers for a name and no saved preference, File > Open asks each time and offers
to remember the choice for the whole extension (``.gz``: every gzip file). napari has no way
for a plugin to rank its reader, only the user's preferences
(``settings.plugins.extension2reader``, pattern -> plugin, the most specific pattern
winning). So the first time napari-meshchop runs in a napari session (its widget, its
sample, its reader), :func:`prefer_for_nifti` adds ``*.nii`` and ``*.nii.gz`` -> this plugin
where the user has set nothing for them, and narrows a ``*.gz`` preference for this plugin
to ``*.nii.gz``. The user's own choices stay; Preferences > Plugins shows and edits them.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from napari.settings import get_settings
from napari.utils.notifications import show_info

from napari_meshchop.errors import InputError
from napari_meshchop.imaging.nifti import is_nifti_path
from napari_meshchop.plugin.layers import layer_kwargs

if TYPE_CHECKING:
    from collections.abc import Callable

    from napari.types import LayerDataTuple

NIFTI_INTENT_LABEL = 1002
PLUGIN = "napari-meshchop"
PATTERNS = ("*.nii", "*.nii.gz")


def prefer_for_nifti() -> bool:
    """Make a plain open (File > Open, drag and drop, ``napari scan.nii.gz``,
    ``viewer.open(path, plugin=None)``) of ``.nii`` and ``.nii.gz`` use this reader, unless
    the user chose another for them; never for other ``.gz`` files. True when it changed
    napari's preferences (the user is told once, in a notification)."""
    settings = get_settings().plugins
    prefs = dict(settings.extension2reader)
    added = [pattern for pattern in PATTERNS if pattern not in prefs]
    prefs.update(dict.fromkeys(added, PLUGIN))
    narrowed = prefs.get("*.gz") == PLUGIN  # "remember for .gz" would capture every gzip
    if narrowed:
        del prefs["*.gz"]
    if not (added or narrowed):
        return False
    settings.extension2reader = prefs
    show_info("napari-meshchop now opens .nii and .nii.gz files "
              "(File > Preferences > Plugins to change it)")
    return True


def napari_get_reader(path: str | list[str]) -> Callable | None:
    """Our reader for one or more 3D NIfTI files, or None so napari tries another plugin."""
    prefer_for_nifti()
    paths = path if isinstance(path, list) else [path]
    if not paths or not all(_readable(p) for p in paths):
        return None
    return read_nifti


def _readable(path) -> bool:
    """A file that nibabel parses as NIfTI and that holds one 3D volume (header only)."""
    if not isinstance(path, (str, os.PathLike)) or not is_nifti_path(path):
        return False
    try:
        img = nib.load(path)
    except Exception:  # a foreign or broken file: another reader may know it
        return False
    shape = img.shape
    return isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) and len(shape) >= 3 and (
        min(shape[:3]) > 1 and all(s == 1 for s in shape[3:]))


def read_nifti(path: str | list[str]) -> list[LayerDataTuple]:
    paths = path if isinstance(path, list) else [path]
    return [read_layer(p) for p in paths]


def read_layer(path: str | os.PathLike) -> LayerDataTuple:
    """One layer: Labels for a label map (NIfTI intent, or binary), else Image."""
    path = Path(path)
    img = nib.load(path)
    try:
        data = np.asanyarray(img.dataobj)  # scl_slope / scl_inter applied
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise InputError(path, f"file is truncated or corrupt ({exc})") from None
    data = data.reshape(data.shape[:3])
    header = img.header.copy()
    is_labels = _is_label_map(data, header)
    if is_labels:
        data = data.astype(np.uint8 if data.max() < 256 else np.int32, copy=False)
    view, transform = layer_kwargs(data, img.affine)
    kwargs = {
        "name": path.name.removesuffix(".gz").removesuffix(".nii"),
        "metadata": {"affine": np.asarray(img.affine), "header": header, "path": str(path)},
        "units": "mm",
        **transform,
    }
    if is_labels:
        return view, kwargs, "labels"
    return view, {**kwargs, "colormap": "gray", "contrast_limits": _display_range(data)}, "image"


def _is_label_map(data: np.ndarray, header) -> bool:
    if int(header.get("intent_code", 0)) == NIFTI_INTENT_LABEL:
        return bool(np.all(data >= 0)) and bool(np.all(data == np.round(data)))
    if data.min() < 0 or data.max() > 1:
        return False
    # A 0/1 volume is a mask, whatever type it was stored as.
    return data.dtype.kind in "bui" or bool(np.all((data == 0) | (data == 1)))


def _display_range(data: np.ndarray) -> tuple[float, float]:
    """Minimum to the 99.5th percentile: bright CSF and fat must not wash out the brain."""
    step = max(1, round((data.size / 2e6) ** (1 / 3)))
    sample = np.asarray(data[::step, ::step, ::step], dtype=np.float32)
    lo, hi = float(sample.min()), float(np.percentile(sample, 99.5))
    return (lo, hi) if hi > lo else (lo, float(sample.max()) if sample.max() > lo else lo + 1)
