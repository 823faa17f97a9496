"""An Export button for any widget that has a checkpoint (Segment's model, Train's result).

``add_export_button(container, get_checkpoint)`` appends the button; pressing it asks for
a format and a folder, runs :func:`export.bundle.export` (a second or two: no worker) and
reports the folder, or the warning a target's input contract calls for, or the error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from magicgui.widgets import Container, PushButton
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QSettings
from qtpy.QtWidgets import QFileDialog, QInputDialog

from napari_meshchop.errors import MeshchopError
from napari_meshchop.network.export import FORMATS
from napari_meshchop.network.export.bundle import ExportResult, export

LABELS = {
    "onnx": "ONNX (onnxruntime, meshchop segment --model model.onnx)",
    "tfjs": "brainchop web app (TensorFlow.js layers model)",
    "brainchop": "brainchop command line (brainchop --custom FOLDER)",
}
LAST_FOLDER = "napari-meshchop/export/folder"

Checkpoint = str | os.PathLike | None


def add_export_button(container: Container, get_checkpoint: Callable[[], Checkpoint],
                      text: str = "Export model...") -> PushButton:
    """Append an Export button to ``container``; ``get_checkpoint()`` names the model to
    export (a checkpoint file or a registry name), or None when there is none yet."""
    button = PushButton(text=text)
    button.tooltip = "Write this model for ONNX or brainchop, with its provenance"
    button.changed.connect(lambda: export_with_dialogs(get_checkpoint(), container.native))
    container.append(button)
    return button


def export_with_dialogs(model: Checkpoint, parent=None) -> ExportResult | None:
    """Ask for a format and a destination folder, export, report. None if not exported."""
    if not model:
        show_error("No model to export yet: choose a checkpoint first")
        return None
    labels = [LABELS[f] for f in FORMATS]
    label, ok = QInputDialog.getItem(parent, "Export model", "Format:", labels, 0, False)
    if not ok:
        return None
    fmt = FORMATS[labels.index(label)]
    settings = QSettings()
    start = Path(settings.value(LAST_FOLDER, str(Path.home()))) / f"{_stem(model)}-{fmt}"
    folder, _ = QFileDialog.getSaveFileName(parent, "Export to a new folder", str(start))
    if not folder:
        return None
    try:
        result = export(model, fmt, folder)
    except MeshchopError as exc:
        show_error(str(exc))
        return None
    settings.setValue(LAST_FOLDER, str(Path(folder).parent))
    for warning in result.warnings:
        show_warning(warning)
    show_info(f"Exported {_stem(model)} ({fmt}) to {result.folder}")
    return result


def _stem(model: Checkpoint) -> str:
    return Path(os.fspath(model)).name.removesuffix(".pt")
