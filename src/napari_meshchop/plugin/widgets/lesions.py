"""The lesion statistics panel: the selected lesion layer's volume and components, live,
and the two ways a corrected mask leaves napari.

Numbers come from :func:`evaluation.lesions.lesion_stats` (what ``meshchop stats``
prints): total mL, 26-connected components with volume, centroid in RAS mm and side of the
midline, the largest one's share. They are computed again a quarter of a second after the
user stops painting or erasing (napari's ``paint`` event; ``data`` when the layer is
replaced; a refresh that changed the lesion's voxel count, for undo and redo), in about
0.1 s at 256^3. Clicking a row jumps to that component; "Delete component" erases it (one
undoable edit, Ctrl-Z); "Export CSV" writes the table.

"Save corrected mask" writes the layer on its scan's own grid with a JSON sidecar (source
scan, model and sha256, threshold, edited, time); "Add to my training set" puts the scan and
the mask into a local data folder that ``meshchop train``, ``evaluate``, ``experiment`` and
``finetune`` read (:mod:`data.corrections`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, Table
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from napari_meshchop.data import corrections
from napari_meshchop.errors import MeshchopError
from napari_meshchop.evaluation.lesions import LesionStats, lesion_stats
from napari_meshchop.imaging.nifti import is_nifti_path
from napari_meshchop.plugin import layers
from napari_meshchop.plugin.widgets.layout import fit_dock

if TYPE_CHECKING:
    import napari

COLUMNS = ["#", "mL", "share %", "x mm", "y mm", "z mm", "side"]
DEBOUNCE_MS = 250
DEFAULT_DATA_DIR = Path("data") / "mine"


def geometry_of(layer) -> layers.Geometry:
    """Where a layer's voxels lie in RAS mm (its NIfTI metadata, else its transform)."""
    world = layers.data_to_world(layer.scale, layer.translate, layer.rotate, layer.shear,
                                 np.array(layer.affine.affine_matrix))
    return layers.resolve(layer.data.shape, world, layer.metadata,
                          [str(u) for u in layer.units], layer.name)


class LesionPanel(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self._viewer = viewer
        self.layer: Labels | None = None  # the layer whose events are connected
        self.stats: LesionStats | None = None
        self._layer = ComboBox(label="Lesion layer", choices=self._labels_layers)
        self._scan = ComboBox(label="Scan", choices=self._image_layers,
                              tooltip="the scan the mask was drawn on (its head places the "
                              "midline; it goes into the training set with the mask)")
        self._summary = Label(value="")
        self.table = Table(value={"data": [], "columns": COLUMNS})
        self._go = PushButton(text="Go to")
        self._delete = PushButton(text="Delete component")
        self._csv = FileEdit(label="CSV", mode="w", filter="*.csv",
                             value=Path("lesion_components.csv"))
        self._export = PushButton(text="Export CSV")
        self._mask_path = FileEdit(label="Mask file", mode="w", filter="*.nii.gz *.nii",
                                   value=Path("corrected_lesion.nii.gz"))
        self._save = PushButton(text="Save corrected mask")
        self._data_dir = FileEdit(label="Training set", mode="d", value=DEFAULT_DATA_DIR,
                                  tooltip="a local data folder (manifest.json, folds.json) "
                                  "for meshchop train, evaluate and finetune")
        self._add = PushButton(text="Add to my training set")
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        self.extend([
            Container(widgets=[self._layer, self._scan], labels=True), self._summary,
            self.table,
            Container(widgets=[self._go, self._delete], layout="horizontal", labels=False),
            Container(widgets=[self._csv, self._export, self._mask_path, self._save,
                               self._data_dir, self._add], labels=True),
            self._status])
        fit_dock(self, grow=self.table.native)

        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.refresh)
        self._layer.changed.connect(self._bind)
        self._scan.changed.connect(lambda *_: self.schedule())
        self.table.native.cellClicked.connect(lambda row, _col: self.go_to(row + 1))
        self._go.clicked.connect(lambda: self.go_to(self.selected()))
        self._delete.clicked.connect(lambda: self.delete(self.selected()))
        self._export.clicked.connect(lambda: self.export_csv(self._csv.value))
        self._save.clicked.connect(lambda: self.save(self._mask_path.value))
        self._add.clicked.connect(lambda: self.add_to_training_set(self._data_dir.value))
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)
        viewer.layers.selection.events.active.connect(self._on_active)
        self._on_active()
        self._bind()

    # ----------------------------------------------------------------- layers

    def _labels_layers(self, _widget=None) -> list[tuple[str, Labels]]:
        return [(lay.name, lay) for lay in self._viewer.layers
                if isinstance(lay, Labels) and lay.ndim == 3]

    def _image_layers(self, _widget=None) -> list[tuple[str, Image | None]]:
        found = [(lay.name, lay) for lay in self._viewer.layers
                 if isinstance(lay, Image) and lay.ndim == 3 and not lay.rgb
                 and lay.metadata.get("probability_of") is None]
        return [("(none)", None), *found]

    def _on_active(self, *_) -> None:
        """Follow the layer list's selection when it is a lesion layer."""
        active = self._viewer.layers.selection.active
        if isinstance(active, Labels) and active.ndim == 3:
            self.reset_choices()
            self._layer.value = active

    def _bind(self, *_) -> None:
        """Listen to the chosen layer's edits (and to no other's); pick its scan."""
        layer = self._layer.value
        if layer is self.layer:
            return
        if self.layer is not None:
            self.layer.events.paint.disconnect(self._on_paint)
            self.layer.events.data.disconnect(self.schedule)
            self.layer.events.set_data.disconnect(self._on_refresh)
        self.layer = layer
        if layer is not None:
            layer.events.paint.connect(self._on_paint)
            layer.events.data.connect(self.schedule)
            layer.events.set_data.connect(self._on_refresh)
            self._scan.reset_choices()
            self._scan.value = self._scan_of(layer)
        self.refresh()

    def _scan_of(self, layer: Labels) -> Image | None:
        """The image the mask belongs to: of its shape, the one whose name begins the
        mask's (Segment names its result after the scan), else the first."""
        images = [lay for _, lay in self._image_layers() if lay is not None]
        same = [lay for lay in images if lay.data.shape == layer.data.shape]
        named = [lay for lay in same if layer.name.startswith(lay.name + " ")]
        return max(named, key=lambda lay: len(lay.name)) if named else (
            same[0] if same else None)

    def _on_paint(self, *_) -> None:
        if self.layer is not None:
            self.layer.metadata["edited"] = True
        self.schedule()

    def _on_refresh(self, *_) -> None:
        """Undo and redo change voxels with no event but a refresh, which slicing emits
        too: count the lesion voxels (milliseconds) to tell them apart."""
        if self.layer is not None and self.stats is not None and \
                np.count_nonzero(np.asarray(self.layer.data)) != self.stats.voxels:
            self.schedule()

    def schedule(self, *_) -> None:
        """Compute the statistics again once the edits pause (debounced)."""
        self._timer.start()

    # ----------------------------------------------------------------- statistics

    def refresh(self) -> None:
        """Compute the layer's statistics now and show them."""
        self._timer.stop()
        layer = self.layer
        if layer is None:
            self.stats = None
            self._summary.value = "Choose a lesion (Labels) layer."
            self._show_rows([])
            return
        scan = self._scan.value
        image = scan.data if scan is not None and scan.data.shape == layer.data.shape else None
        self.stats = lesion_stats(np.asarray(layer.data), geometry_of(layer).affine,
                                  None if image is None else np.asarray(image),
                                  keep_labels=True)
        s = self.stats
        side = "" if not s.components else (
            f"; midline at RAS x = {s.midline_x:.1f} mm ({s.midline_from})")
        self._summary.value = f"{s.summary()}{side}"
        self._show_rows([[c.number, round(c.volume_ml, 3), round(100 * c.share, 1),
                          *(round(v, 1) for v in c.centroid_mm), c.side]
                         for c in s.components])

    def _show_rows(self, rows: list[list]) -> None:
        self.table.value = {"data": rows, "index": [str(r[0]) for r in rows],
                            "columns": COLUMNS}

    def selected(self) -> int | None:
        """The component of the table's current row (1 = the largest), or None."""
        row = self.table.native.currentRow()
        return row + 1 if row >= 0 and self.stats and row < len(self.stats.components) else None

    def go_to(self, number: int | None) -> None:
        """Centre the view on component ``number`` and slice through its centroid."""
        if number is None or self.stats is None or self.layer is None:
            return
        component = self.stats.components[number - 1]
        world = np.asarray(self.layer.data_to_world(component.centroid_voxel), dtype=float)
        self._viewer.dims.set_point(range(len(world)), tuple(world))
        scene = getattr(self._viewer, "scene", self._viewer)  # napari 0.9 moved the camera
        scene.camera.center = tuple(world)
        self._status.value = (f"Component {number}: {component.volume_ml:.2f} mL, "
                              f"{component.side}")

    def delete(self, number: int | None) -> None:
        """Erase component ``number`` from the layer (one edit; Ctrl-Z brings it back)."""
        if number is None or self.stats is None or self.layer is None:
            show_info("Click a component in the table first.")
            return
        component = self.stats.components[number - 1]
        indices = np.nonzero(self.stats.component_mask(number))
        self.layer.data_setitem(indices, 0)  # emits paint: the statistics follow
        self._status.value = f"Deleted component {number} ({component.volume_ml:.2f} mL)."
        self.refresh()

    def export_csv(self, path) -> Path | None:
        if self.stats is None:
            show_error("Choose a lesion layer first.")
            return None
        written = self.stats.write_csv(Path(path))
        self._status.value = f"Components written to {written}."
        return written

    # ----------------------------------------------------------------- corrections

    def provenance(self) -> corrections.Provenance:
        """Where the mask came from: its scan, model, threshold and whether it was edited."""
        meta, scan = self.layer.metadata, self._scan.value
        source = None if scan is None else scan.metadata.get("path") or scan.name
        model = str(meta.get("model_path") or meta.get("model", ""))
        sha = meta.get("model_sha256") or corrections.model_sha256(model)
        return corrections.Provenance(
            source_scan=str(source or ""),
            model=model, model_sha256=sha, threshold=meta.get("threshold"),
            edited=bool(meta.get("edited", False)))

    def _mask_native(self) -> tuple[np.ndarray, np.ndarray]:
        """The layer's voxels in its scan file's own order, with that file's affine."""
        return layers.to_native(np.asarray(self.layer.data), geometry_of(self.layer))

    def save(self, path) -> tuple[Path, Path] | None:
        """Write the layer on its scan's grid, with the provenance sidecar beside it."""
        try:
            if self.layer is None:
                raise MeshchopError("choose a lesion layer first")
            path = Path(path)
            if not is_nifti_path(path):
                path = path.with_name(path.name + ".nii.gz")
            voxels, affine = self._mask_native()
            written = corrections.save_corrected(voxels, affine, path, self.provenance())
        except MeshchopError as exc:
            show_error(str(exc))
            self._status.value = f"Error: {exc}"
            return None
        self._status.value = f"Saved {written[0]} and {written[1].name}."
        return written

    def add_to_training_set(self, data_dir) -> corrections.Added | None:
        """Put the scan and this mask into ``data_dir`` (the same scan again: replaced)."""
        try:
            scan = self._scan.value
            if self.layer is None or scan is None:
                raise MeshchopError("choose a lesion layer and the scan it was drawn on")
            mask, mask_affine = self._mask_native()
            source, name = self._scan_source(scan, mask.shape, mask_affine)
            added = corrections.add(data_dir, source, mask, name=name,
                                    provenance=self.provenance(), affine=mask_affine)
        except MeshchopError as exc:
            show_error(str(exc))
            self._status.value = f"Error: {exc}"
            return None
        self._status.value = " ".join(added.summary())
        show_info(added.summary()[0])
        return added

    def _scan_source(self, scan: Image, shape, affine) -> tuple:
        """The scan's own file when it is on the mask's grid (copied as it is), else the
        layer's voxels as a NIfTI image; and the name the pair is named from."""
        path = scan.metadata.get("path")
        if path and Path(path).is_file() and is_nifti_path(path):
            on_file = nib.load(path)
            if on_file.shape[:3] == tuple(shape) and np.allclose(on_file.affine, affine,
                                                                 atol=1e-3):
                return path, Path(path).name
        voxels, native_affine = layers.to_native(np.asarray(scan.data), geometry_of(scan))
        return nib.Nifti1Image(np.asarray(voxels, dtype=np.float32), native_affine), scan.name
