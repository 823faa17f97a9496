"""The Segment widget: pick an image, a model and a device; run the core in a thread worker.

The widget only orchestrates. The worker runs :func:`inference.segment` (a generator) and
never touches a layer or a widget: progress arrives in ``yielded``, the mask in
``returned``, and layers change only there, on the main thread. Nothing is added before
the result is complete, so Cancel and errors leave no half-made layer behind.

A run belongs to its widget and its image: closing the widget, removing the image or
closing the viewer stops it (the core checks the stop flag slab by slab, so within a
second or two) and its result, should one still arrive, is dropped. Each result is a new
layer named by scan and model; nothing is overwritten.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import napari
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
from qtpy.QtWidgets import QFileDialog, QSizePolicy

from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.events import Progress, check_stop
from napari_meshchop.network import registry
from napari_meshchop.network.inference import SegmentResult, available_devices, segment
from napari_meshchop.plugin import layers, save
from napari_meshchop.plugin.reader import prefer_for_nifti
from napari_meshchop.plugin.widgets.export import add_export_button
from napari_meshchop.plugin.widgets.feedback import (
    ActivityBar,
    Timer,
    clock,
    report_error,
)
from napari_meshchop.plugin.widgets.layout import fit_dock, when_closed
from napari_meshchop.plugin.widgets.paths import elide_path
from napari_meshchop.plugin.widgets.threshold import ThresholdControl

CHECKPOINT = "checkpoint file..."
ENSEMBLE = "ensemble of checkpoints..."  # the mean of several models' lesion probabilities
_OPEN: weakref.WeakSet = weakref.WeakSet()  # Segment widgets alive now


@dataclass(frozen=True)
class Offered:
    """A checkpoint that training wrote, offered as a Model choice (never chosen for you)."""

    path: str
    label: str

    def __str__(self) -> str:
        return self.label


@dataclass
class Source:
    """What the worker needs of an image layer, read on the main thread."""

    name: str
    data: Any
    transform: dict
    metadata: dict
    geometry: layers.Geometry

    @classmethod
    def of(cls, layer: Image) -> Source:
        transform = {"scale": np.array(layer.scale), "translate": np.array(layer.translate),
                     "rotate": np.array(layer.rotate), "shear": np.array(layer.shear),
                     "affine": np.array(layer.affine.affine_matrix), "units": layer.units}
        world = layers.data_to_world(layer.scale, layer.translate, layer.rotate, layer.shear,
                                     transform["affine"])
        geometry = layers.resolve(layer.data.shape, world, layer.metadata,
                                  [str(u) for u in layer.units], layer.name)
        return cls(layer.name, layer.data, transform, dict(layer.metadata), geometry)


def segment_layer(source: Source, model: str | list[str], device: str, stop):
    """The worker's job: the layer's voxels as a NIfTI image, then the core's generator."""
    yield Progress("load", 0, 1, source.name)
    img = layers.to_nifti(source.data, source.geometry, source.name)
    check_stop(stop)
    return (yield from segment(img, model, device, stop))


def model_tag(model: str | list[str]) -> str:
    """A short, file-name-safe name for a model choice: the registry name, a checkpoint's
    run folder and file (``meshnet_best``), or ``ensemble-N``."""
    if isinstance(model, list):
        return f"ensemble-{len(model)}"
    if model in registry.REGISTRY:
        return model
    path = Path(model)
    tag = path.stem if path.stem not in ("best", "last", "previous", "final") else \
        f"{path.parent.name}_{path.stem}"
    return safe_name(tag)


def safe_name(text: str) -> str:
    """Letters, digits, ``-``, ``_`` and ``.`` only: a layer name a save dialog can use."""
    return re.sub(r"[^\w.-]+", "-", text).strip("-") or "layer"


def lesion_layer_name(scan: str, model: str | list[str], taken) -> str:
    """``<scan>_lesion_<model>``, with ``_2``, ``_3``... when that name is taken."""
    base = f"{safe_name(scan)}_lesion_{model_tag(model)}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


class SegmentWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self._viewer = viewer
        self.worker = None  # the running thread worker, or None
        self._stop = threading.Event()
        self._run_layer = None  # the image layer of the running job
        self._timer: Timer | None = None
        self._activity: ActivityBar | None = None
        self.closed = False
        self.last: Labels | None = None  # the layer of the latest result
        self._image = ComboBox(label="Image", choices=self._image_layers, nullable=True)
        self._offered: list[Offered] = []  # checkpoints from training, as Model choices
        self._model = ComboBox(label="Model", choices=self._model_choices)
        self._checkpoint = elide_path(FileEdit(label="Checkpoint", mode="r",
                                               filter="*.pt *.pth", visible=False))
        self._ensemble = elide_path(FileEdit(
            label="Checkpoints", mode="rm", filter="*.pt *.pth", visible=False,
            tooltip="two or more checkpoints trained on the same grid (e.g. the folds' best.pt)"))
        self._device = ComboBox(label="Device", choices=available_devices())
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        buttons = Container(widgets=[self._run, self._cancel], layout="horizontal",
                            labels=False)
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._geometry = _wrapping_label()
        self._status = _wrapping_label()
        self._time = _wrapping_label()
        self._result = _wrapping_label()
        self._save = PushButton(text="Save lesion as NIfTI...", enabled=False)
        inputs = Container(widgets=[self._image, self._model, self._checkpoint,
                                    self._ensemble, self._device], labels=True)
        # Progress and messages span the dock's width, under the labelled inputs.
        self.threshold = ThresholdControl(viewer)  # re-thresholds the result from P(lesion)
        self.extend([inputs, self._geometry, buttons, self._progress, self._status,
                     self._time, self._result, self.threshold, self._save])
        add_export_button(self, self._model_to_export)
        fit_dock(self)
        self._image.value = next((c for c in self._image.choices if c is not None), None)

        self._image.changed.connect(self._describe)
        self._model.changed.connect(self._on_model)
        self._run.clicked.connect(self.run)
        self._cancel.clicked.connect(self.cancel)
        self._save.clicked.connect(self._ask_save)
        # napari resets choices of docked widgets itself; this also covers undocked use.
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.events.removed.connect(self._on_removed)
        when_closed(self, self._on_closed)
        self._restore_settings()
        self._on_model()
        self._describe()
        _OPEN.add(self)
        prefer_for_nifti()  # File > Open of a .nii.gz now comes to our reader

    def offer_checkpoint(self, path: str | Path, label: str) -> Offered:
        """Add a checkpoint (e.g. one the Train widget just wrote) to the Model choices,
        labelled with its run and epoch; the current choice stays as it is."""
        offered = Offered(str(path), label)
        self._offered = [o for o in self._offered if o.path != offered.path] + [offered]
        current = self._model.value
        self._model.reset_choices()
        self._model.value = current
        return offered

    # ----------------------------------------------------------------- inputs

    def _image_layers(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb]

    def _model_choices(self, _widget=None) -> list[tuple[str, Any]]:
        return [*((n, n) for n in registry.names("model")),
                *((o.label, o) for o in self._offered), (CHECKPOINT, CHECKPOINT),
                (ENSEMBLE, ENSEMBLE)]

    def _on_inserted(self, event) -> None:
        self.reset_choices()
        layer = event.value
        if self._image.value is None and isinstance(layer, Image) and \
                layer in self._image.choices:
            self._image.value = layer  # the first scan opened is the one to segment

    def _on_removed(self, event) -> None:
        """A removed image leaves the choice empty (it never jumps to another scan); if
        it was the running job's, the job stops and its result will be dropped."""
        if event.value is self._run_layer and self.worker is not None:
            self._abandon(f"'{event.value.name}' was removed")
        self.reset_choices()

    def _on_closed(self, destroyed: bool) -> None:
        """Taken out of its dock, or its Qt widgets deleted with the window: a running job
        stops, and from now on the worker's signals change nothing."""
        self.closed = True
        self._stop.set()
        if self.worker is not None and not destroyed:
            self._abandon("the widget was closed")
        self._run_layer = None

    def _on_model(self, *_):
        self._checkpoint.visible = self._model.value == CHECKPOINT
        self._ensemble.visible = self._model.value == ENSEMBLE
        value = self._model.value
        entry = registry.REGISTRY.get(value) if isinstance(value, str) else None
        self._model.tooltip = (
            entry.description if entry else
            value.path if isinstance(value, Offered) else
            "a MeshNet checkpoint (.pt)" if value == CHECKPOINT else
            "several MeshNet checkpoints; their mean lesion probability decides")

    def _describe(self, *_):
        layer = self._image.value
        if layer is None:
            self._geometry.value = ("Choose a 3D image, or open one (File > Open, or File > "
                                    "Open Sample).")
            return
        geometry = Source.of(layer).geometry
        size = " x ".join(f"{z:g}" for z in np.round(geometry.voxel_size, 3))
        shape = " x ".join(str(s) for s in layer.data.shape)
        self._geometry.value = " ".join(geometry.notes) or f"{shape} voxels of {size} mm."

    def model_choice(self) -> str | list[str]:
        """A registry name, a checkpoint path, or a list of paths for an ensemble."""
        value = self._model.value
        if isinstance(value, Offered):
            if not Path(value.path).is_file():
                raise MeshchopError(f"{value.path}: checkpoint file not found")
            return value.path
        if value == ENSEMBLE:
            paths = [Path(p) for p in self._ensemble.value or ()]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise MeshchopError(f"{missing[0]}: checkpoint file not found")
            if len(paths) < 2:
                raise MeshchopError("choose two or more checkpoint files (.pt) for an ensemble")
            return [str(p) for p in paths]
        if value != CHECKPOINT:
            return value
        path = Path(self._checkpoint.value)
        if not path.is_file():
            raise MeshchopError("choose a checkpoint file (.pt) first")
        return str(path)

    def _model_to_export(self) -> str | None:
        """The chosen model, when it is one model (an ensemble is not exported)."""
        try:
            choice = self.model_choice()
        except MeshchopError:
            return None
        return choice if isinstance(choice, str) else None

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
        self._run_layer = layer
        # Handlers go in through _connect: otherwise superqt re-raises worker errors.
        # napari's own cancel (closing the window) asks the worker to quit; the core sees
        # it through the same flag as Cancel, between slabs.
        stop = self._stop
        worker = create_worker(
            segment_layer, source, model, self._device.value,
            lambda: stop.is_set() or worker.abort_requested, _start_thread=False,
            _connect={"yielded": self._on_progress, "errored": self._on_error,
                      "returned": lambda result: self._show(result, source, model),
                      "finished": self._on_finished})
        self.worker = worker
        self._set_running(True)
        self._result.value = ""
        self._timer = Timer("network")
        self._activity = ActivityBar(f"Segmenting {source.name}")
        self._status.value = f"Segmenting {source.name}..."
        self.worker.start()

    def cancel(self) -> None:
        """Ask the worker to stop at its next step; nothing is added to the viewer."""
        if self.worker is not None:
            self._stop.set()
            self._cancel.enabled = False
            self._status.value = "Cancelling..."

    def _abandon(self, why: str) -> None:
        """Stop the running job for good: its result, if it still comes, is dropped."""
        self._stop.set()
        self._run_layer = None
        self._cancel.enabled = False
        self._status.value = f"Stopped: {why}; nothing will be added."

    def _on_progress(self, event) -> None:
        if not isinstance(event, Progress) or self.closed:
            return
        if self._run_layer is not None:  # an abandoned job keeps its last words
            self._status.value = f"{event.stage}: {event.message}".rstrip(": ")
        self._progress.max = max(event.total, 1)
        self._progress.value = min(event.done, event.total)
        if self._timer is not None:
            self._time.value = self._timer.update(event)
        if self._activity is not None:
            self._activity.update(event)

    def _show(self, result: SegmentResult, source: Source, model) -> None:
        """Put the mask in the viewer as a new layer on the image's exact transform (main
        thread); dropped when the widget was closed or the image removed meanwhile."""
        layer = self._run_layer
        if self.closed or layer is None or layer not in self._viewer.layers:
            return
        name = lesion_layer_name(source.name, model, {lay.name for lay in self._viewer.layers})
        metadata = {**source.metadata, "lesion_ml": result.lesion_ml, "model": result.model}
        self.last = self._viewer.add_labels(
            result.mask, name=name, metadata=metadata, opacity=0.6, colormap=_lesion_colors(),
            **source.transform)
        show_lesion_in_3d(layer, self.last)
        self.threshold.show(result, self.last, source.transform, model)
        self._result.value = (f"{name}: {result.lesion_ml:.1f} mL ({result.lesion_voxels} "
                              f"voxels); model {result.model} on {result.device}")
        self._status.value = "Done."
        self._save.enabled = True

    def _on_error(self, exc: Exception) -> None:
        if self._run_layer is None or self.closed:  # abandoned: the status says why
            return
        if isinstance(exc, Cancelled):
            self._status.value = "Cancelled; nothing was added."
            show_info("Segmentation cancelled")
        else:
            report_error(self._status, "Segmentation", exc)

    def _on_finished(self) -> None:
        self.worker = None
        self._run_layer = None
        if self._activity is not None:
            self._activity.close()
            self._activity = None
        if self._timer is not None and not self.closed:
            self._time.value = f"Took {clock(self._timer.elapsed())}."
            self._set_running(False)
        self._timer = None

    def _set_running(self, running: bool) -> None:
        self._run.enabled = not running
        self._cancel.enabled = running
        if running:
            self._progress.value = 0

    # ----------------------------------------------------------------- saving

    def _ask_save(self) -> None:
        layer = self.last
        if layer is None or layer not in self._viewer.layers:
            show_error("the lesion layer is gone; run the segmentation again")
            self._save.enabled = False
            return
        path, _ = QFileDialog.getSaveFileName(self.native, "Save lesion as NIfTI",
                                              str(save.proposed_path(layer)), save.FILTER)
        if path:
            self.save(layer, path)

    def save(self, layer: Labels, path: str | Path) -> list[str]:
        """Write ``layer`` through napari's own save path with this plugin's NIfTI writer:
        on the scan's voxel grid, affine and header codes; ``.nii.gz`` added when missing."""
        written = save.save_labels(layer, path)
        if written:
            self._status.value = f"Saved {written[0]}"
        return written

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
        """What the user chose and ran with; a checkpoint offered by training is saved as
        the file it is, because the user picked it."""
        settings = QSettings("napari-meshchop", "segment")
        value = self._model.value
        settings.setValue("device", self._device.value)
        if isinstance(value, Offered):
            settings.setValue("model", CHECKPOINT)
            settings.setValue("checkpoint", value.path)
            return
        settings.setValue("model", value)
        if value == CHECKPOINT:
            settings.setValue("checkpoint", str(self._checkpoint.value))
        if value == ENSEMBLE:  # one path a line: QSettings' lists vary by platform
            settings.setValue("ensemble", "\n".join(str(p) for p in self._ensemble.value))


def offer_checkpoint(viewer, path: str | Path, label: str) -> int:
    """Offer ``path`` as a Model choice labelled ``label`` in the Segment widgets open in
    ``viewer``; nothing is selected or remembered for the user. How many widgets got it."""

    def unwrapped(v):  # napari hands plugins a proxy of the viewer
        return getattr(v, "__wrapped__", v)

    widgets = [w for w in list(_OPEN) if unwrapped(w._viewer) is unwrapped(viewer)]
    for widget in widgets:
        widget.offer_checkpoint(path, label)
    return len(widgets)


def show_lesion_in_3d(image: Image, lesion: Labels) -> None:
    """In 3D, the scan as a see-through volume and the lesion drawn inside it, visible
    through the brain; 2D views are unchanged."""
    image.rendering = "attenuated_mip"
    image.attenuation = 0.03
    lesion.blending = "translucent_no_depth"


def _lesion_colors() -> DirectLabelColormap:
    """Lesion in orange-red, everything else see-through."""
    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                           1: (1.0, 0.3, 0.1, 1.0)})


def _wrapping_label() -> Label:
    label = Label(value="")
    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
    return label


def checkpoint_label(result) -> str:
    """"run <folder>, epoch N (best.pt, val Dice 0.61)": which run, which epoch, which file."""
    path = result.checkpoint
    if path == result.best:
        scored = [r for r in result.history if r.get("val_dice") is not None]
        best = max(scored, key=lambda r: r["val_dice"]) if scored else None
        epoch = best["epoch"] + 1 if best else result.epochs_done
        dice = f", val Dice {best['val_dice']:.2f}" if best else ""
        return f"run {result.out_dir.name}, epoch {epoch} ({path.name}{dice})"
    return f"run {result.out_dir.name}, epoch {result.epochs_done} ({path.name})"
