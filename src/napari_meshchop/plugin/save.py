"""File > IO Utilities > Save lesion as NIfTI...: the selected Labels layer as NIfTI on its
scan's grid, without napari's Save dialog preselecting TIFF (see docs/napari.md, Save)."""

from __future__ import annotations

from pathlib import Path

import napari
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog

from napari_meshchop.plugin.widgets.paths import data_home

FILTER = "NIfTI (*.nii.gz *.nii)"


def proposed_path(layer: Labels) -> Path:
    """``<the scan's folder>/<layer name>.nii.gz``, or under the user's data folder when
    the layer's scan came from no file."""
    scan = layer.metadata.get("path")
    folder = Path(scan).parent if scan else data_home() / "lesions"
    return folder / f"{layer.name}.nii.gz"


def save_labels(layer: Labels, path: str | Path) -> list[str]:
    """Through napari's own save path, with this plugin's NIfTI writer (``.nii.gz`` is
    added to a name without it)."""
    return napari.save_layers(str(path), [layer], plugin="napari-meshchop")


def save_dialog(viewer: napari.viewer.Viewer) -> list[str]:
    """Ask where, proposing :func:`proposed_path`, and save the active Labels layer."""
    layer = viewer.layers.selection.active
    if not isinstance(layer, Labels):
        show_error("select a Labels layer (a lesion) to save as NIfTI")
        return []
    path, _ = QFileDialog.getSaveFileName(None, "Save lesion as NIfTI",
                                          str(proposed_path(layer)), FILTER)
    if not path:
        return []
    written = save_labels(layer, path)
    if written:
        show_info(f"Saved {written[0]}")
    return written
