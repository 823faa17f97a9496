"""The Segment widget: pick an image, a model and a device; run the core in a thread worker.

The widget only orchestrates. The worker runs :func:`inference.segment` (a generator) and
never touches a layer or a widget: progress arrives in ``yielded``, the mask in
``returned``, and layers change only there, on the main thread. Nothing is added before
the result is complete, so Cancel and errors leave no half-made layer behind.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
)
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QSettings
from qtpy.QtWidgets import QSizePolicy

from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.events import Progress, check_stop
from napari_meshchop.network import registry
from napari_meshchop.network.inference import SegmentResult, available_devices, segment
from napari_meshchop.plugin import layers
from napari_meshchop.plugin.widgets.feedback import report_error

if TYPE_CHECKING:
    import napari

CHECKPOINT = "checkpoint file..."
ENSEMBLE = "ensemble of checkpoints..."  # the mean of several models' lesion probabilities
_OPEN: weakref.WeakSet = weakref.WeakSet()  # Segment widgets alive now


@dataclass
class Source:
    """What the worker needs of an image layer, read on the main thread."""

    name: str
    data: Any
    transform: dict
    metadata: dict
    geometry: layers.Geometry

    @classmethod
    def of(cls, layer: napari.layers.Image) -> Source:
        transform = {"scale": np.array(layer.scale), "translate": np.array(layer.translate),
                     "rotate": np.array(layer.rotate), "shear": np.array(layer.shear),
                     "affine": np.array(layer.affine.affine_matrix), "units": layer.units}
        world = layers.data_to_world(layer.scale, layer.translate, layer.rotate, layer.shear,
                                     transform["affine"])
        geometry = layers.resolve(layer.data.shape, world, layer.metadata,
                                  [str(u) for u in layer.units], layer.name)
        return cls(layer.name, layer.data, transform, dict(layer.metadata), geometry)


def segment_layer(source: Source, model: str | list[str], device: str,
                  stop: threading.Event):
    """The worker's job: the layer's voxels as a NIfTI image, then the core's generator."""
    yield Progress("load", 0, 1, source.name)
    img = layers.to_nifti(source.data, source.geometry, source.name)
    check_stop(stop)
    return (yield from segment(img, model, device, stop))


class SegmentWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self._viewer = viewer
        self.worker = None  # the running thread worker, or None
        self._stop = threading.Event()
        self._image = ComboBox(label="Image", choices=self._image_layers)
        self._model = ComboBox(label="Model",
                               choices=[*registry.names("model"), CHECKPOINT, ENSEMBLE])
        self._checkpoint = FileEdit(label="Checkpoint", mode="r", filter="*.pt *.pth",
                                    visible=False)
        self._ensemble = FileEdit(label="Checkpoints", mode="rm", filter="*.pt *.pth",
                                  visible=False, tooltip="two or more checkpoints trained "
                                  "on the same grid (e.g. the folds' best.pt)")
        self._device = ComboBox(label="Device", choices=available_devices())
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        buttons = Container(widgets=[self._run, self._cancel], layout="horizontal",
                            labels=False)
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._geometry = _wrapping_label()
        self._status = _wrapping_label()
        self._result = _wrapping_label()
        inputs = Container(widgets=[self._image, self._model, self._checkpoint,
                                    self._ensemble, self._device], labels=True)
        # Progress and messages span the dock's width, under the labelled inputs.
        self.extend([inputs, self._geometry, buttons, self._progress, self._status,
                     self._result])

        self._image.changed.connect(self._describe)
        self._model.changed.connect(self._on_model)
        self._run.clicked.connect(self.run)
        self._cancel.clicked.connect(self.cancel)
        # napari resets choices of docked widgets itself; this also covers undocked use.
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)
        self._restore_settings()
        self._on_model()
        self._describe()
        _OPEN.add(self)

    def use_checkpoint(self, path: str | Path) -> None:
        """Choose a checkpoint file as the model (e.g. one the Train widget just wrote)."""
        self._model.value = CHECKPOINT
        self._checkpoint.value = Path(path)
        self._on_model()

    # ----------------------------------------------------------------- inputs

    def _image_layers(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb]

    def _on_model(self, *_):
        self._checkpoint.visible = self._model.value == CHECKPOINT
        self._ensemble.visible = self._model.value == ENSEMBLE
        entry = registry.REGISTRY.get(self._model.value)
        self._model.tooltip = entry.description if entry else (
            "a MeshNet checkpoint (.pt)" if self._model.value == CHECKPOINT else
            "several MeshNet checkpoints; their mean lesion probability decides")

    def _describe(self, *_):
        layer = self._image.value
        if layer is None:
            self._geometry.value = "Open a 3D image (File > Open, or File > Open Sample)."
            return
        geometry = Source.of(layer).geometry
        size = " x ".join(f"{z:g}" for z in np.round(geometry.voxel_size, 3))
        shape = " x ".join(str(s) for s in layer.data.shape)
        self._geometry.value = " ".join(geometry.notes) or f"{shape} voxels of {size} mm."

    def model_choice(self) -> str | list[str]:
        """A registry name, a checkpoint path, or a list of paths for an ensemble."""
        if self._model.value == ENSEMBLE:
            paths = [Path(p) for p in self._ensemble.value or ()]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise MeshchopError(f"{missing[0]}: checkpoint file not found")
            if len(paths) < 2:
                raise MeshchopError("choose two or more checkpoint files (.pt) for an ensemble")
            return [str(p) for p in paths]
        if self._model.value != CHECKPOINT:
            return self._model.value
        path = Path(self._checkpoint.value)
        if not path.is_file():
            raise MeshchopError("choose a checkpoint file (.pt) first")
        return str(path)

    # ----------------------------------------------------------------- running

    def run(self) -> None:
        """Start segmenting the chosen image; returns at once (the worker runs on)."""
        if self.worker is not None:
            return
        layer = self._image.value
        try:
            if layer is None:
                raise MeshchopError("open a 3D image layer first")
            model = self.model_choice()
        except MeshchopError as exc:
            show_error(str(exc))
            return
        source = Source.of(layer)
        self._save_settings()
        self._stop = threading.Event()
        # Handlers go in through _connect: otherwise superqt re-raises worker errors.
        self.worker = create_worker(
            segment_layer, source, model, self._device.value, self._stop,
            _start_thread=False,
            _connect={"yielded": self._on_progress, "errored": self._on_error,
                      "returned": lambda result: self._show(result, source),
                      "finished": self._on_finished})
        self._set_running(True)
        self._result.value = ""
        self._status.value = f"Segmenting {source.name}..."
        self.worker.start()

    def cancel(self) -> None:
        """Ask the worker to stop at its next step; nothing is added to the viewer."""
        if self.worker is not None:
            self._stop.set()
            self._cancel.enabled = False
            self._status.value = "Cancelling..."

    def _on_progress(self, event) -> None:
        if isinstance(event, Progress):
            self._status.value = f"{event.stage}: {event.message}".rstrip(": ")
            self._progress.max = max(event.total, 1)
            self._progress.value = min(event.done, event.total)

    def _show(self, result: SegmentResult, source: Source) -> None:
        """Put the mask in the viewer on the image's exact transform (main thread)."""
        name = f"{source.name} lesion"
        metadata = {**source.metadata, "lesion_ml": result.lesion_ml, "model": result.model}
        old = next((lay for lay in self._viewer.layers
                    if lay.name == name and isinstance(lay, Labels)), None)
        if old is None:
            self._viewer.add_labels(result.mask, name=name, metadata=metadata, opacity=0.6,
                                    colormap=_lesion_colors(), **source.transform)
        else:  # replace in place: keeps the user's position in the list and display tweaks
            old.data = result.mask
            for key, value in source.transform.items():
                setattr(old, key, value)
            old.metadata = metadata
        self._result.value = (f"Lesion: {result.lesion_ml:.1f} mL ({result.lesion_voxels} "
                              f"voxels); model {result.model} on {result.device}")
        self._status.value = "Done."

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled):
            self._status.value = "Cancelled; nothing was added."
            show_info("Segmentation cancelled")
        else:
            report_error(self._status, "Segmentation", exc)

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self._run.enabled = not running
        self._cancel.enabled = running
        if running:
            self._progress.value = 0

    # ----------------------------------------------------------------- settings

    def _restore_settings(self) -> None:
        """Model, checkpoint and device as last run, when they are still valid here."""
        settings = QSettings("napari-meshchop", "segment")
        model, path = settings.value("model", ""), settings.value("checkpoint", "")
        device = settings.value("device", "")
        ensemble = [p for p in str(settings.value("ensemble", "") or "").split("\n") if p]
        if model in self._model.choices:
            self._model.value = model
        if path and Path(path).is_file():
            self._checkpoint.value = path
        if ensemble and all(Path(p).is_file() for p in ensemble):
            self._ensemble.value = ensemble
        if device in self._device.choices:
            self._device.value = device

    def _save_settings(self) -> None:
        settings = QSettings("napari-meshchop", "segment")
        settings.setValue("model", self._model.value)
        settings.setValue("device", self._device.value)
        if self._model.value == CHECKPOINT:
            settings.setValue("checkpoint", str(self._checkpoint.value))
        if self._model.value == ENSEMBLE:  # one path a line: QSettings' lists vary by platform
            settings.setValue("ensemble", "\n".join(str(p) for p in self._ensemble.value))


def offer_checkpoint(viewer, path: str | Path) -> None:
    """Make ``path`` the Segment widget's model: now if one is open in ``viewer``, and
    the next time one opens (through the saved settings)."""
    settings = QSettings("napari-meshchop", "segment")
    settings.setValue("model", CHECKPOINT)
    settings.setValue("checkpoint", str(path))

    def unwrapped(v):  # napari hands plugins a proxy of the viewer
        return getattr(v, "__wrapped__", v)

    for widget in list(_OPEN):
        if unwrapped(widget._viewer) is unwrapped(viewer):
            widget.use_checkpoint(path)


def _lesion_colors() -> DirectLabelColormap:
    """Lesion in orange-red, everything else see-through."""
    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                           1: (1.0, 0.3, 0.1, 1.0)})


def _wrapping_label() -> Label:
    label = Label(value="")
    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
    return label
