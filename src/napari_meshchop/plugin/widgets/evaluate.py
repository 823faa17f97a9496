"""The Evaluate widget: score a model (or an ensemble) on a fold, subject by subject.

It runs :func:`evaluate.evaluate` (the generator ``meshchop evaluate`` drives) in a thread
worker. Each :class:`~napari_meshchop.evaluation.evaluate.SubjectResult` arrives in ``yielded``, on the
main thread, and becomes a row of a sortable table; a summary line follows the rows. The
predicted masks are saved to a folder the widget owns, so selecting a row shows that
subject's scan, truth and prediction as layers in one world frame (read by the plugin's
own reader in a second worker). Stop keeps the rows already done.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Labels
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QSettings, Qt
from qtpy.QtGui import QColor, QFontDatabase
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHeaderView,
    QMenu,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_meshchop.data import manifest as _manifest
from napari_meshchop.data.folds import fold_ids
from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.evaluation import evaluate
from napari_meshchop.events import Progress
from napari_meshchop.network import registry
from napari_meshchop.network.inference import available_devices
from napari_meshchop.plugin.reader import read_layer
from napari_meshchop.plugin.widgets.feedback import background_job, cohort_problem, report_error
from napari_meshchop.plugin.widgets.layout import fit_dock
from napari_meshchop.plugin.widgets.paths import default_folder, elide_path

if TYPE_CHECKING:
    import napari

CHECKPOINTS = "checkpoint files..."
PARTS = [("outer fold: test", "test"), ("inner fold: val", "val")]
# Table columns: header, SubjectResult.to_row key, number format (None: text).
COLUMNS = [("#", None, "{:d}"), ("Subject", "subject", None),
           ("Acquisition", "acquisition", None), ("True (mL)", "true_ml", "{:.2f}"),
           ("Predicted (mL)", "pred_ml", "{:.2f}"), ("Dice", "dice", "{:.3f}"),
           ("Macro Dice", "macro_dice", "{:.3f}"), ("AVD", "avd", "{:.2f}"),
           ("MCC", "mcc", "{:.3f}"), ("Error", "error", None)]
SUMMARY = [("Dice", "dice"), ("Macro Dice", "macro_dice"), ("AVD", "avd"), ("MCC", "mcc")]
# Shown at first: what fits a dock's width; right-click the header for the others.
SHOWN = ("Subject", "Dice", "Macro Dice", "AVD", "MCC")
RESULT_ROLE = Qt.ItemDataRole.UserRole + 1  # on column 0: the row's place in .results
TRUTH_RGBA = (0.2, 0.85, 0.3, 1.0)
PREDICTION_RGBA = (1.0, 0.3, 0.1, 1.0)


class NumberItem(QTableWidgetItem):
    """A cell that shows a formatted number and sorts by the number itself."""

    def __init__(self, value: float, fmt: str):
        ok = value is not None and math.isfinite(value)
        super().__init__(fmt.format(value) if ok else "")
        self.setData(Qt.ItemDataRole.UserRole, float(value) if value is not None else math.nan)
        self.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def value(self) -> float:
        return self.data(Qt.ItemDataRole.UserRole)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if not isinstance(other, NumberItem):
            return super().__lt__(other)
        a, b = self.value(), other.value()
        if math.isnan(a) or math.isnan(b):
            # Empty cells (a failed subject, an undefined AVD) go last in either order.
            table = self.tableWidget()
            descending = table is not None and (table.horizontalHeader().sortIndicatorOrder()
                                                == Qt.SortOrder.DescendingOrder)
            return math.isnan(a) != math.isnan(b) and (math.isnan(a) == descending)
        return a < b


def subject_layers(data_dir: Path, pair: _manifest.Pair, prediction: Path | None):
    """The worker's job when a row is selected: scan, truth and prediction as layer data
    (the reader's transform for each file), and what could not be read."""
    wanted = [("scan", data_dir / pair.image)]
    if prediction is not None:
        wanted.append(("prediction", Path(prediction)))
    wanted.append(("truth", data_dir / pair.mask))  # on top, as an outline
    found, problems = [], []
    for role, path in wanted:
        if not path.is_file():
            problems.append(f"{path}: file not found")
            continue
        try:
            data, kwargs, _ = read_layer(path)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a damaged file
            problems.append(str(exc) if isinstance(exc, MeshchopError)
                            else f"{path}: not readable ({type(exc).__name__}: {exc})")
            continue
        kwargs = {**kwargs, "name": f"{pair.id} {role}"}
        if role != "scan":  # binarised as for training: a mask stored as 1/255 stays a mask
            kwargs = {k: v for k, v in kwargs.items() if k not in ("colormap", "contrast_limits")}
            data = (np.asarray(data) > 0).astype(np.uint8)
        found.append((role, np.asarray(data), kwargs))
    return found, problems


class EvaluateWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self._viewer = viewer
        self.worker = None  # the evaluation's thread worker, or None
        self.loader = None  # the worker reading a selected subject's files, or None
        self._stop = threading.Event()
        self.results: list[evaluate.SubjectResult] = []
        self.shown: list = []  # layers of the selected subject
        self._run_dir: Path | None = None  # data folder and manifest of the table's run
        self._manifest: _manifest.Manifest | None = None
        self._total = 0
        # Predicted masks live here while the widget does; each run gets a fresh folder.
        self._scratch = tempfile.TemporaryDirectory(prefix="meshchop-evaluate-")
        self._predictions: Path | None = None
        self._runs = 0

        self._model = ComboBox(label="Model", choices=[*registry.names("model"), CHECKPOINTS])
        self._checkpoints = elide_path(FileEdit(
            label="Checkpoints", mode="rm", filter="*.pt *.pth",
            tooltip="one checkpoint, or several for an ensemble (their softmax outputs are "
            "averaged)"))
        self._data = elide_path(FileEdit(label="Data folder", mode="d",
                                         value=default_folder("arc")))
        self._outer = SpinBox(label="Outer fold", min=0, max=9, value=0)
        self._part = ComboBox(label="Part", choices=PARTS, value="test")
        self._inner = SpinBox(label="Inner fold", min=0, max=9, value=0, enabled=False)
        self._device = ComboBox(label="Device", choices=available_devices())
        inputs = Container(widgets=[self._model, self._checkpoints, self._data, self._outer,
                                    self._part, self._inner, self._device], labels=True)
        self._run = PushButton(text="Run")
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._status = _wrapping_label()
        self._summary = Label(value="")
        self._summary.native.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self._export = PushButton(text="Export CSV...", enabled=False)
        self.extend([inputs, self._run, self._progress, self._status])

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c[0] for c in COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self._pick_columns()
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)  # the order they finished
        self.table.setWordWrap(False)
        self.table.setMinimumHeight(180)
        # The table, then its summary and Export under it (magicgui would put its own
        # widgets above a plain Qt one).
        results = QWidget()
        column = QVBoxLayout(results)
        column.setContentsMargins(0, 0, 0, 0)
        for widget in (self.table, self._summary.native, self._export.native):
            column.addWidget(widget)
        self.native.layout().addWidget(results)
        fit_dock(self, grow=results)

        self._model.changed.connect(self._on_model)
        self._part.changed.connect(lambda v: setattr(self._inner, "enabled", v == "val"))
        self._run.clicked.connect(self.toggle)
        self._export.clicked.connect(self._ask_export)
        self.table.itemSelectionChanged.connect(self._on_select)
        self._restore_settings()
        self._on_model()

    # ----------------------------------------------------------------- columns

    def _pick_columns(self) -> None:
        """The main scores fit the dock without sideways scrolling; the header's context
        menu shows or hides the other columns."""
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(False)
        header.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        header.customContextMenuRequested.connect(self._column_menu)
        header.setToolTip("Right-click to choose the columns")
        for name, *_ in COLUMNS:
            self.show_column(name, name in SHOWN)

    def show_column(self, name: str, shown: bool = True) -> None:
        self.table.setColumnHidden([c[0] for c in COLUMNS].index(name), not shown)

    def shown_columns(self) -> list[str]:
        return [c[0] for i, c in enumerate(COLUMNS) if not self.table.isColumnHidden(i)]

    def _column_menu(self, position) -> None:
        menu = QMenu(self.table)
        for index, (name, *_) in enumerate(COLUMNS):
            action = menu.addAction(name)
            action.setCheckable(True)
            action.setChecked(not self.table.isColumnHidden(index))
            action.toggled.connect(lambda on, name=name: self.show_column(name, on))
        menu.exec(self.table.horizontalHeader().mapToGlobal(position))

    # ----------------------------------------------------------------- inputs

    def _on_model(self, *_):
        self._checkpoints.visible = self._model.value == CHECKPOINTS

    def models(self) -> list[str]:
        """The model (a registry name) or the checkpoint files of an ensemble."""
        if self._model.value != CHECKPOINTS:
            return [self._model.value]
        paths = [Path(p) for p in self._checkpoints.value]
        if not paths:
            raise MeshchopError("choose one checkpoint file (.pt), or several for an ensemble")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise MeshchopError(f"{missing[0]}: checkpoint file not found")
        return [str(p) for p in paths]

    def subject_ids(self, data_dir: Path) -> list[str]:
        inner = self._inner.value if self._part.value == "val" else None
        ids = fold_ids(data_dir, self._outer.value, self._part.value, inner)
        if not ids:
            raise MeshchopError(f"{data_dir}: that part of the fold has no subjects")
        return ids

    # ----------------------------------------------------------------- running

    def toggle(self) -> None:
        """Run, or, while running, Stop: the subject in progress is dropped at its next stop
        check (between network layers), the finished rows stay."""
        if self.worker is None:
            self.start()
        else:
            self.stop()

    def start(self) -> None:
        if self.worker is not None:
            return
        data_dir = Path(self._data.value).expanduser()
        if problem := cohort_problem(data_dir):
            self._status.value = problem
            show_error(problem)
            return
        try:
            models = self.models()
            manifest = _manifest.load(data_dir)
            ids = self.subject_ids(data_dir)
        except MeshchopError as exc:
            self._status.value = f"Error: {exc}"
            show_error(str(exc))
            return
        self._save_settings()
        self._clear()
        self._run_dir, self._manifest, self._total = data_dir, manifest, len(ids)
        if self._predictions is not None:  # the last run's masks; its layers keep their copy
            shutil.rmtree(self._predictions, ignore_errors=True)
        self._runs += 1
        self._predictions = Path(self._scratch.name) / f"run-{self._runs}"
        self._stop = threading.Event()
        self.worker = background_job(
            self, evaluate.evaluate, models, data_dir, ids, device=self._device.value,
            predictions_dir=self._predictions, stop=self._stop)
        self._set_running(True)
        self._progress.max, self._progress.value = len(ids), 0
        self._status.value = f"Evaluating {len(ids)} subjects..."
        self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self._stop.set()
            self._run.text = "Stopping..."
            self._run.enabled = False
            self._status.value = "Stopping..."

    def _clear(self) -> None:
        self.results = []
        self.table.clearSelection()
        self.table.setRowCount(0)
        self._summary.value = ""
        self._export.enabled = False

    def _on_event(self, event) -> None:
        if isinstance(event, evaluate.SubjectResult):
            self.add_result(event)
        elif isinstance(event, Progress):
            if event.stage == "evaluate":
                self._progress.max = max(event.total, 1)
                self._progress.value = min(event.done, event.total)
                self._status.value = f"Subject {min(event.done + 1, event.total)} of " \
                                     f"{event.total}: {event.message}"
            else:
                self._status.value = event.message or event.stage

    def add_result(self, result: evaluate.SubjectResult) -> None:
        """One more row (main thread), then the summary over all rows so far."""
        self.results.append(result)
        row = result.to_row()
        # Rows jump to their sorted place as cells are set; fill the row unsorted.
        self.table.setSortingEnabled(False)
        at = self.table.rowCount()
        self.table.insertRow(at)
        for column, (_, key, fmt) in enumerate(COLUMNS):
            if key is None:
                item = NumberItem(result.index + 1, fmt)
                item.setData(RESULT_ROLE, len(self.results) - 1)
            elif fmt is None:
                item = QTableWidgetItem(str(row[key]))
            else:
                item = NumberItem(row[key], fmt)
            if result.error:
                item.setToolTip(result.error)
                if key == "error":
                    item.setForeground(QColor("red"))
                    self.show_column("Error")
            self.table.setItem(at, column, item)
        self.table.setSortingEnabled(True)
        self.table.resizeColumnsToContents()
        self._summary.value = summary_text(self.results)
        self._export.enabled = True

    def _on_result(self, results: list[evaluate.SubjectResult]) -> None:
        failed = sum(not r.ok for r in results)
        self._status.value = (f"Done: {len(results)} subjects"
                              + (f", {failed} failed (see their rows)." if failed else ".")
                              + " Select a row to see its scan, truth and prediction.")

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled):
            self._status.value = (f"Stopped after {len(self.results)} of {self._total} "
                                  "subjects; their rows stay.")
            show_info("Evaluation stopped")
        else:
            report_error(self._status, "Evaluation", exc)

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self._run.text = "Stop" if running else "Run"
        self._run.enabled = True
        for widget in (self._model, self._checkpoints, self._data, self._outer, self._part,
                       self._inner, self._device):
            widget.enabled = not running and (widget is not self._inner
                                              or self._part.value == "val")

    # ----------------------------------------------------------------- a subject's layers

    def result_at(self, row: int) -> evaluate.SubjectResult:
        return self.results[self.table.item(row, 0).data(RESULT_ROLE)]

    def _on_select(self) -> None:
        rows = {index.row() for index in self.table.selectionModel().selectedRows()}
        if len(rows) == 1:
            self.show_subject(self.result_at(rows.pop()))

    def show_subject(self, result: evaluate.SubjectResult) -> None:
        """Read the subject's files in a worker; its layers replace the last subject's."""
        if self._manifest is None or self._run_dir is None:
            return
        try:
            pair = self._manifest.pair(result.subject)
        except KeyError:
            show_error(f"{result.subject} is not in {_manifest.path(self._run_dir)}")
            return
        loader = create_worker(
            subject_layers, self._run_dir, pair, result.prediction, _start_thread=False,
            _connect={"returned": lambda loaded: self._show_layers(result, *loaded),
                      "errored": lambda exc: report_error(self._status, "Opening", exc)})
        loader.finished.connect(lambda: self._on_loaded(loader))
        self.loader = loader
        self._status.value = f"Opening {result.subject}..."
        loader.start()

    def _on_loaded(self, loader) -> None:
        if self.loader is loader:
            self.loader = None

    def _show_layers(self, result: evaluate.SubjectResult, found, problems) -> None:
        rows = {index.row() for index in self.table.selectionModel().selectedRows()}
        if not any(r is result for r in self.results) or (
                len(rows) == 1 and self.result_at(rows.pop()) is not result):
            return  # a slower read of an earlier selection, or of an earlier run's row
        subject = result.subject
        for layer in self.shown:
            if layer in self._viewer.layers:
                self._viewer.layers.remove(layer)
        self.shown = []
        for role, data, kwargs in found:
            if role == "scan":
                self.shown.append(self._viewer.add_image(data, **kwargs))
            elif role == "prediction":
                self.shown.append(self._viewer.add_labels(
                    data, opacity=0.6, colormap=_label_colors(PREDICTION_RGBA), **kwargs))
            else:  # the truth's outline over the filled prediction: both stay visible
                truth = self._viewer.add_labels(data, opacity=1.0,
                                                colormap=_label_colors(TRUTH_RGBA), **kwargs)
                truth.contour = 1
                self.shown.append(truth)
        self._go_to_lesion()
        if problems:
            self._status.value = f"{subject}: " + "; ".join(problems)
            show_error(problems[0])
        else:
            self._status.value = f"{subject}: scan, prediction (orange) and truth (green outline)."

    def _go_to_lesion(self) -> None:
        """Fit the view to the subject's scan, and slice through the centre of the true
        lesion (else through the scan's middle)."""
        if not self.shown:
            return
        try:
            self._viewer.fit_to_view(layers=self.shown)
        except (AttributeError, TypeError):  # an older napari: fit every layer
            self._viewer.reset_view()
        truth = next((lay for lay in self.shown if isinstance(lay, Labels)
                      and lay.name.endswith(" truth")), None)
        if truth is None or not np.any(truth.data):
            return
        centre = np.argwhere(np.asarray(truth.data)).mean(axis=0)
        self._viewer.dims.set_point(range(3), truth.data_to_world(centre))

    # ----------------------------------------------------------------- CSV

    def _ask_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.native, "Export evaluation",
                                              "evaluation.csv", "CSV (*.csv)")
        if path:
            try:
                self.export_csv(path)
            except OSError as exc:
                report_error(self._status, "Export", exc)

    def export_csv(self, path: str | Path) -> Path:
        """Every column of each subject's record, in the order they finished, written
        atomically; an undefined score (NaN) or a failed subject's counts are empty cells."""
        out = evaluate.write_csv(path, self.results)
        self._status.value = f"Wrote {len(self.results)} rows to {out}"
        return out

    # ----------------------------------------------------------------- settings

    def _restore_settings(self) -> None:
        settings = QSettings("napari-meshchop", "evaluate")
        model = settings.value("model", "")
        if model in self._model.choices:
            self._model.value = model
        paths = [p for p in (settings.value("checkpoints", "") or "").split("\n") if p]
        if paths and all(Path(p).is_file() for p in paths):
            self._checkpoints.value = paths
        if settings.value("data", ""):
            self._data.value = settings.value("data")
        for key, spin in (("outer", self._outer), ("inner", self._inner)):
            value = settings.value(key, None)
            if value is not None and str(value).isdigit():
                spin.value = min(int(value), spin.max)
        if settings.value("part", "") in ("test", "val"):
            self._part.value = settings.value("part")
        if settings.value("device", "") in self._device.choices:
            self._device.value = settings.value("device")

    def _save_settings(self) -> None:
        settings = QSettings("napari-meshchop", "evaluate")
        settings.setValue("model", self._model.value)
        settings.setValue("checkpoints", "\n".join(str(p) for p in self._checkpoints.value))
        settings.setValue("data", str(self._data.value))
        settings.setValue("outer", self._outer.value)
        settings.setValue("inner", self._inner.value)
        settings.setValue("part", self._part.value)
        settings.setValue("device", self._device.value)


def summary_text(results) -> str:
    """Mean +/- SD, median and IQR of the table's main metrics, one line each."""
    stats = evaluate.summary(results)
    failed = sum(not r.ok for r in results)
    lines = [f"{len(results) - failed} subjects scored" + (f", {failed} failed" if failed else "")]
    for name, key in SUMMARY:
        s = stats[key]
        if not s["n"]:
            lines.append(f"{name:<10}  -")
            continue
        line = (f"{name:<10}  {s['mean']:.3f} ± {s['sd']:.3f}   median {s['median']:.3f} "
                f"(IQR {s['q1']:.3f}-{s['q3']:.3f})")
        if s["skipped"]:
            line += f"   {s['skipped']} undefined"
        lines.append(line)
    return "\n".join(lines)


def _label_colors(rgba) -> DirectLabelColormap:
    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: rgba})


def _wrapping_label() -> Label:
    label = Label(value="")
    label.native.setWordWrap(True)
    return label
