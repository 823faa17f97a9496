"""The cohort panel: segment every image of a folder or a BIDS dataset, as `meshchop bids`.

It runs :func:`run.find_and_segment` (the participant then the group level, the same
generator the command line drives) in a thread worker. Each :class:`run.ImageDone` arrives
in ``yielded``, on the main thread, and becomes a row: volume, components, status. Selecting
a row opens that scan and its mask as layers (read by the plugin's own reader in a second
worker). Stop ends the run at the next network layer, keeping the finished images; Run
again resumes: finished images are read back from their sidecars, not segmented again.

``CohortPanel`` is a magicgui ``Container`` (its ``.native`` is the QWidget): a dock widget
of its own, or, built with ``dock=False``, a part of another widget (which then fits the
dock). Taken out of its dock, or deleted with the window, it stops its run.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
)
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QSettings, Qt, QUrl
from qtpy.QtGui import QColor, QDesktopServices
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

from napari_meshchop.cohort import derivatives, find, run
from napari_meshchop.cohort.derivatives import Record
from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.events import Progress
from napari_meshchop.network import registry
from napari_meshchop.network.inference import available_devices
from napari_meshchop.plugin.reader import read_layer
from napari_meshchop.plugin.widgets.evaluate import NumberItem
from napari_meshchop.plugin.widgets.feedback import background_job, report_error
from napari_meshchop.plugin.widgets.layout import fit_dock, when_closed

if TYPE_CHECKING:
    import napari

CHECKPOINTS = "checkpoint files..."
COLUMNS = ["Image", "Lesion (mL)", "Components", "Status"]
RECORD_ROLE = Qt.ItemDataRole.UserRole + 1  # on column 0: the row's place in .records
LESION_RGBA = (1.0, 0.3, 0.1, 1.0)


def image_layers(record: Record, out_dir: Path):
    """The worker's job when a row is selected: the scan and (when done) its mask as layer
    data with the reader's transform. A failed image's scan, when it can be read at all."""
    if not record.ok:
        try:
            return [("scan", *read_layer(record.image.path)[:2])]
        except Exception:  # noqa: BLE001 - its row already says why it failed
            return []
    data, kwargs, _ = read_layer(derivatives.outputs(record.image, out_dir).mask)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("colormap", "contrast_limits")}
    return [("scan", *read_layer(record.image.path)[:2]),
            ("mask", (np.asarray(data) > 0).astype(np.uint8), kwargs)]


class CohortPanel(Container):
    def __init__(self, viewer: napari.viewer.Viewer, dock: bool = True):
        super().__init__(labels=False)
        self._viewer = viewer
        self.closed = False  # taken out of its dock: the worker's signals change nothing
        self.worker = None  # the cohort run's thread worker, or None
        self.loader = None  # the worker reading a selected row's files, or None
        self._stop = threading.Event()
        self.records: list[Record] = []
        self.shown: list = []  # layers of the selected row
        self.out_dir: Path | None = None
        self.report: Path | None = None

        self._source = FileEdit(label="Images", mode="d", tooltip="a BIDS dataset (with "
                                "dataset_description.json) or a folder of NIfTI files")
        self._output = FileEdit(label="Output", mode="d", tooltip="where masks, sidecars "
                                "and pictures go (empty: BIDS_DIR/derivatives/meshchop, or "
                                "a folder beside the images' folder)")
        self._suffix = LineEdit(label="BIDS suffix", value="T2w")
        self._model = ComboBox(label="Model", choices=[*registry.names("model"), CHECKPOINTS])
        self._checkpoints = FileEdit(label="Checkpoints", mode="rm", filter="*.pt *.pth",
                                     visible=False, tooltip="one checkpoint, or several for "
                                     "an ensemble (their mean P(lesion) decides)")
        self._device = ComboBox(label="Device", choices=available_devices())
        self._probability = CheckBox(text="Save P(lesion) maps (probseg)")
        self.inputs = Container(widgets=[self._source, self._output, self._suffix, self._model,
                                         self._checkpoints, self._device, self._probability],
                                labels=True)
        self._run = PushButton(text="Run")
        self._report = PushButton(text="Open report", enabled=False)
        buttons = Container(widgets=[self._run, self._report], layout="horizontal",
                            labels=False)
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        self.extend([self.inputs, buttons, self._progress, self._status])

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setSortingEnabled(True)
        self.table.setWordWrap(False)
        self.table.setMinimumHeight(180)
        self.native.layout().addWidget(self.table)
        if dock:
            fit_dock(self, grow=self.table)

        self._model.changed.connect(self._on_model)
        self._run.clicked.connect(self.toggle)
        self._report.clicked.connect(self.open_report)
        self.table.itemSelectionChanged.connect(self._on_select)
        when_closed(self, self._on_closed)
        self._restore_settings()
        self._on_model()

    # ----------------------------------------------------------------- inputs

    def _on_model(self, *_):
        self._checkpoints.visible = self._model.value == CHECKPOINTS

    def options(self) -> run.Options:
        if self._model.value != CHECKPOINTS:
            models = (self._model.value,)
        else:
            models = tuple(str(p) for p in self._checkpoints.value or ())
            if not models:
                raise MeshchopError("choose a checkpoint file (.pt), or several for an "
                                    "ensemble")
        return run.Options(models, self._device.value, 0.5, self._probability.value)

    def chosen(self) -> tuple[Path, Path]:
        """The images' folder and the output folder (the default one when left empty)."""
        source = Path(self._source.value).expanduser()
        if str(self._source.value) in ("", ".") or not source.is_dir():
            raise MeshchopError("choose a folder of NIfTI images or a BIDS dataset")
        output = str(self._output.value)
        out = run.default_output(source) if output in ("", ".") else Path(output).expanduser()
        return source, out

    # ----------------------------------------------------------------- running

    def toggle(self) -> None:
        """Run, or, while running, Stop (finished images stay; Run again resumes)."""
        if self.worker is None:
            self.start()
        else:
            self.stop()

    def start(self) -> None:
        if self.worker is not None:
            return
        try:
            source, out = self.chosen()
            options = self.options()
        except MeshchopError as exc:
            self._status.value = f"Error: {exc}"
            show_error(str(exc))
            return
        self._save_settings()
        self.records = []
        self.table.clearSelection()
        self.table.setRowCount(0)
        self.out_dir, self.report = out, None
        self._report.enabled = False
        self._stop = threading.Event()
        self.worker = background_job(
            self, run.find_and_segment, source, out, options, self._suffix.value or "T2w",
            stop=self._stop)
        self._set_running(True)
        self._status.value = f"Looking for images in {source}..."
        self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self._stop.set()
            self._run.text = "Stopping..."
            self._run.enabled = False

    def _on_closed(self, destroyed: bool) -> None:
        """Out of its dock, or deleted with the window: the run stops after its network
        layer (finished images stay on disk), and no widget is touched from now on."""
        self.closed = True
        self._stop.set()

    def _on_event(self, event) -> None:
        if self.closed:
            return
        if isinstance(event, find.Cohort):
            self._progress.max, self._progress.value = max(len(event), 1), 0
            self._status.value = f"{len(event)} images; results go to {self.out_dir}"
        elif isinstance(event, run.ImageDone):
            self.add_record(event.record)
            self._progress.max, self._progress.value = max(event.total, 1), event.done
        elif isinstance(event, Progress):
            done = len(self.records)
            self._status.value = (f"Image {done + 1}: {Path(event.message).name}, "
                                  f"{event.stage} {event.done}/{event.total}"
                                  if event.stage == "network" else
                                  f"{event.stage}: {event.message}")

    def add_record(self, record: Record) -> None:
        """One more row (main thread)."""
        self.records.append(record)
        m = record.measures
        status = ("done earlier" if record.reused else record.status) if record.ok else \
            record.status
        self.table.setSortingEnabled(False)  # rows jump while their cells are set otherwise
        at = self.table.rowCount()
        self.table.insertRow(at)
        cells = [QTableWidgetItem(record.image.key),
                 NumberItem(None if m is None else m.lesion_ml, "{:.2f}"),
                 NumberItem(None if m is None else m.components, "{:.0f}"),
                 QTableWidgetItem(status)]
        cells[0].setData(RECORD_ROLE, len(self.records) - 1)
        for column, item in enumerate(cells):
            if record.error:
                item.setToolTip(record.error)
                if column == 3:
                    item.setForeground(QColor("red"))
            self.table.setItem(at, column, item)
        self.table.setSortingEnabled(True)
        self.table.resizeColumnsToContents()

    def _on_result(self, result: run.GroupResult) -> None:
        if self.closed:
            return
        self.report = result.report
        self._report.enabled = True
        failed = result.count("failed")
        self._status.value = (f"Done: {result.count('done')} of {len(result.records)} images "
                              "segmented" + (f", {failed} failed (hover for why)" if failed
                                             else "")
                              + f". Table and report in {result.out_dir}.")

    def _on_error(self, exc: Exception) -> None:
        if self.closed:
            return
        if isinstance(exc, Cancelled):
            self._status.value = (f"Stopped after {len(self.records)} images; they are kept. "
                                  "Run again to go on.")
            show_info("Cohort stopped")
        else:
            report_error(self._status, "Cohort", exc)

    def _on_finished(self) -> None:
        self.worker = None
        if not self.closed:
            self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self._run.text = "Stop" if running else "Run"
        self._run.enabled = True
        self.inputs.enabled = not running

    def open_report(self) -> None:
        if self.report is not None and self.report.is_file():
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.report)))

    # ----------------------------------------------------------------- a row's layers

    def record_at(self, row: int) -> Record:
        return self.records[self.table.item(row, 0).data(RECORD_ROLE)]

    def _on_select(self) -> None:
        rows = {index.row() for index in self.table.selectionModel().selectedRows()}
        if len(rows) == 1 and self.out_dir is not None:
            self.show_record(self.record_at(rows.pop()))

    def show_record(self, record: Record) -> None:
        """Read the scan and its mask in a worker; they replace the last row's layers."""
        loader = create_worker(
            image_layers, record, self.out_dir, _start_thread=False,
            _connect={"returned": lambda found: self._show_layers(record, found),
                      "errored": lambda exc: report_error(self._status, "Opening", exc)})
        loader.finished.connect(lambda: self._on_loaded(loader))
        self.loader = loader
        loader.start()

    def _on_loaded(self, loader) -> None:
        if self.loader is loader:
            self.loader = None

    def _show_layers(self, record: Record, found) -> None:
        for layer in self.shown:
            if layer in self._viewer.layers:
                self._viewer.layers.remove(layer)
        self.shown = []
        name = Path(record.image.key).name
        for role, data, kwargs in found:
            kwargs = {**kwargs, "name": f"{name} {role}"}
            if role == "scan":
                self.shown.append(self._viewer.add_image(data, **kwargs))
            else:
                self.shown.append(self._viewer.add_labels(
                    data, opacity=0.6, colormap=DirectLabelColormap(
                        color_dict={None: "transparent", 0: "transparent", 1: LESION_RGBA}),
                    **kwargs))
                if data.any():  # through the lesion's centre
                    centre = np.argwhere(data).mean(axis=0)
                    self._viewer.dims.set_point(range(3), self.shown[-1].data_to_world(centre))
        self._status.value = f"{record.image.key}: " + (
            "scan and mask (orange)." if record.ok else f"{record.status}: {record.error}")

    # ----------------------------------------------------------------- settings

    def _restore_settings(self) -> None:
        settings = QSettings("napari-meshchop", "cohort")
        for key, edit in (("source", self._source), ("output", self._output)):
            value = settings.value(key, "")
            if value and Path(value).is_dir():
                edit.value = value
        if settings.value("suffix", ""):
            self._suffix.value = settings.value("suffix")
        if settings.value("model", "") in self._model.choices:
            self._model.value = settings.value("model")
        paths = [p for p in (settings.value("checkpoints", "") or "").split("\n") if p]
        if paths and all(Path(p).is_file() for p in paths):
            self._checkpoints.value = paths
        if settings.value("device", "") in self._device.choices:
            self._device.value = settings.value("device")

    def _save_settings(self) -> None:
        settings = QSettings("napari-meshchop", "cohort")
        settings.setValue("source", str(self._source.value))
        output = str(self._output.value)
        settings.setValue("output", "" if output in ("", ".") else output)
        settings.setValue("suffix", self._suffix.value)
        settings.setValue("model", self._model.value)
        settings.setValue("checkpoints", "\n".join(str(p) for p in self._checkpoints.value))
        settings.setValue("device", self._device.value)
