"""The Train widget: a fold, a width, epochs, a device; Start becomes Stop; a live plot.

It runs :func:`train.train` (the generator the CLI drives) in a thread worker. The worker
never touches a widget or a layer: events arrive in ``yielded`` and the result in
``returned``, on the main thread, where the bars and the plot are updated. When a run
ends or stops, its checkpoint is offered to the Segment widget.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
    CheckBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info

from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Notice
from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.plugin.widgets.feedback import report_error
from napari_meshchop.plugin.widgets.segment import offer_checkpoint
from napari_meshchop.plugin.widgets.settings import SettingsForm, shown
from napari_meshchop.studies import engine, hpo, space
from napari_meshchop.training import config as _config
from napari_meshchop.training.config import TrainConfig
from napari_meshchop.training.fold import train
from napari_meshchop.training.loop import EpochEnd, Step, TrainResult

if TYPE_CHECKING:
    import napari



class LossPlot:
    """Training loss per step and validation Dice per epoch, in a matplotlib canvas."""

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.loss_axes = self.figure.add_subplot(111)
        self.dice_axes = self.loss_axes.twinx()
        self.loss_axes.set_xlabel("step")
        self.loss_axes.set_ylabel("loss")
        self.dice_axes.set_ylabel("val Dice")
        self.dice_axes.set_ylim(0, 1)
        (self.loss_line,) = self.loss_axes.plot([], [], lw=1, color="tab:blue")
        (self.dice_line,) = self.dice_axes.plot([], [], "o-", color="tab:orange")
        self.clear()

    def clear(self) -> None:
        self.steps, self.losses, self.epoch_steps, self.dices = [], [], [], []
        self._update()

    def add_step(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def add_epoch(self, step: int, val_dice: float | None) -> None:
        if val_dice is not None:
            self.epoch_steps.append(step)
            self.dices.append(val_dice)
        self._update()

    def _update(self) -> None:
        self.loss_line.set_data(self.steps, self.losses)
        self.dice_line.set_data(self.epoch_steps, self.dices)
        self.loss_axes.relim()
        self.loss_axes.autoscale_view()
        self.canvas.draw_idle()


class TrainWidget(Container):
    BASIC = ("channels", "epochs", "device")  # the settings shown without "Advanced"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self._viewer = viewer
        self.worker = None
        self._stop = threading.Event()
        self.result: TrainResult | None = None
        self._data = FileEdit(label="Data folder", mode="d", value="data/arc")
        self._outer = SpinBox(label="Outer fold", min=0, max=9, value=0)
        self._inner = SpinBox(label="Inner fold", min=0, max=9, value=0)
        self._full = CheckBox(text="Train on the full outer fold (no validation)")
        self._out = FileEdit(label="Run folder", mode="d", value="runs/meshnet")
        self._resume = CheckBox(text="Resume the run in this folder")
        self._advanced = CheckBox(text="Advanced")
        # The settings' fields come from their metadata (training/config.py).
        basic = self.BASIC
        self.settings = SettingsForm(basic)
        self.advanced_settings = SettingsForm(tuple(n for n in shown() if n not in basic))
        self._preprocess = self.advanced_settings.fields["preprocess"]
        self._shape = SpinBox(label="Grid (ras-minmax)", min=8, max=512, value=256)
        advanced = Container(widgets=[self.advanced_settings, self._shape], labels=False,
                             visible=False)
        self._advanced_box = advanced
        inputs = Container(widgets=[
            Container(widgets=[self._data, self._outer, self._inner], labels=True),
            self.settings, Container(widgets=[self._out], labels=True)], labels=False)
        self._start = PushButton(text="Start")
        self._epoch_bar = ProgressBar(label="Epochs", min=0, max=1, value=0)
        self._step_bar = ProgressBar(label="Steps", min=0, max=1, value=0)
        self._status = Label(value="")
        self.plot = LossPlot()
        self.extend([inputs, self._full, self._resume, self._advanced, advanced, self._start,
                     Container(widgets=[self._epoch_bar, self._step_bar], labels=True),
                     self._status])
        self.native.layout().addWidget(self.plot.canvas)
        self.search = SearchSection(self)
        self._search_box = CheckBox(text="Search hyperparameters (ASHA)")
        self._search_box.changed.connect(lambda v: setattr(self.search, "visible", bool(v)))
        self.extend([self._search_box, self.search])
        self._advanced.changed.connect(lambda v: setattr(advanced, "visible", bool(v)))
        self._full.changed.connect(lambda v: setattr(self._inner, "enabled", not v))
        self._start.clicked.connect(self.toggle)

    def config(self) -> TrainConfig:
        shape = (self._shape.value,) * 3 if self._preprocess.value == "ras-minmax" else None
        spec = PreprocessSpec(self._preprocess.value, **({"shape": shape} if shape else {}))
        return TrainConfig(
            **self.settings.values(), **self.advanced_settings.values(),
            preprocess=spec.to_dict(), data_dir=str(self._data.value),
            outer_fold=self._outer.value,
            inner_fold=None if self._full.value else self._inner.value,
            full_outer=self._full.value)

    def toggle(self) -> None:
        """Start, or, while running, Stop (after the current step, leaving a checkpoint)."""
        if self.worker is None:
            if self.search.worker is not None:
                show_error("A hyperparameter search is running; stop it first.")
                return
            self.start()
        else:
            self.stop()

    def start(self) -> None:
        try:
            config = self.config()
        except (MeshchopError, ValueError) as exc:
            show_error(str(exc))
            return
        self._stop = threading.Event()
        self.result = None
        self.plot.clear()
        self._epoch_bar.max = config.epochs
        self._epoch_bar.value = 0
        self.worker = create_worker(
            train, config, Path(self._out.value), self._resume.value, self._stop,
            _start_thread=False,
            _connect={"yielded": self._on_event, "returned": self._on_result,
                      "errored": self._on_error, "finished": self._on_finished})
        self._start.text = "Stop"
        self._status.value = "Training..."
        self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self._stop.set()
            self._status.value = "Stopping after this step..."

    def _on_event(self, event) -> None:
        if isinstance(event, Step):
            self._step_bar.max = max(event.total, 1)
            self._step_bar.value = event.done
            self.plot.add_step(event.done, event.loss)
            self._status.value = f"{event.message}: loss {event.loss:.4f}"
        elif isinstance(event, EpochEnd):
            self._epoch_bar.max = event.epochs
            self._epoch_bar.value = event.epoch + 1
            self.plot.add_epoch(self._step_bar.value, event.val_dice)
        elif isinstance(event, Notice):
            self._status.value = event.message

    def _on_result(self, result: TrainResult) -> None:
        self.result = result
        self.plot.add_epoch(result.step, None)
        self._epoch_bar.value = result.epochs_done
        verb = "Stopped" if result.stopped else "Finished"
        self._status.value = f"{verb} after {result.epochs_done} epochs; {result.checkpoint}"
        offer_checkpoint(self._viewer, result.checkpoint)
        show_info(f"Training {verb.lower()}; checkpoint {result.checkpoint}")

    def _on_error(self, exc: Exception) -> None:
        report_error(self._status, "Training", exc)

    def _on_finished(self) -> None:
        self.worker = None
        self._start.text = "Start"


COLUMNS = ["trial", "state", "mean Dice"]


class SearchSection(Container):
    """ASHA on the inner folds of the Train widget's outer fold, with its recipe
    (:func:`hpo.search`, what ``meshchop hpo`` runs): trials, storage, study; Start
    becomes Stop; finished trials are listed as they come, with the best so far."""

    def __init__(self, owner: TrainWidget):
        super().__init__(labels=False, visible=False)
        self._owner = owner
        self.worker = None
        self._stop = threading.Event()
        self.result: hpo.SearchResult | None = None
        defaults = space.Space()
        self._trials = SpinBox(label="Trials", min=1, max=10_000, value=space.TRIALS)
        self._min_epochs = SpinBox(label="Min epochs (rung 1)", min=1, max=10_000,
                                   value=defaults.min_epochs)
        self._max_epochs = SpinBox(label="Max epochs", min=1, max=10_000,
                                   value=defaults.max_epochs)
        self._storage = LineEdit(label="Storage", value="",
                                 tooltip="empty: a journal file in the run folder; or a "
                                 "database URL that workers on other machines share")
        self._study = LineEdit(label="Study", value=space.STUDY)
        self._start = PushButton(text="Start search")
        self._best = Label(value="")
        self._status = Label(value="")
        self.rows: list[list] = []  # trial, state, mean Dice: as trials finish
        self.table = Table(value=[], columns=COLUMNS)
        self.extend([Container(widgets=[self._trials, self._min_epochs, self._max_epochs,
                                        self._storage, self._study], labels=True),
                     self._start, self._status, self._best, self.table])
        self._start.clicked.connect(self.toggle)

    def toggle(self) -> None:
        if self.worker is None:
            if self._owner.worker is not None:
                show_error("Training is running; stop it first.")
                return
            self.start()
        else:
            self._stop.set()
            self._status.value = "Stopping after this step..."

    def start(self) -> None:
        try:
            config = self._owner.config()
            chosen = space.Space(min_epochs=self._min_epochs.value,
                                 max_epochs=self._max_epochs.value)
        except (MeshchopError, ValueError) as exc:
            show_error(str(exc))
            return
        self._stop = threading.Event()
        self.result = None
        self._show_rows([])
        self.worker = create_worker(
            hpo.search, config, Path(self._owner._out.value), self._trials.value, chosen,
            self._storage.value.strip() or None, self._study.value.strip() or space.STUDY,
            stop=self._stop, _start_thread=False,
            _connect={"yielded": self._on_event, "returned": self._on_result,
                      "errored": self._on_error, "finished": self._on_finished})
        self._start.text = "Stop search"
        self._status.value = "Searching..."
        self.worker.start()

    def _on_event(self, event) -> None:
        if isinstance(event, engine.Claimed):
            verb = "resumed" if event.resumed else "running"
            self._status.value = f"Trial {event.number} {verb}"
        elif isinstance(event, hpo.TrialReport):
            self._status.value = (f"Trial {event.number}: epoch {event.epoch}/{event.epochs}, "
                                  f"mean Dice {event.mean:.3f}")
        elif isinstance(event, engine.Finished):
            value = "" if event.value is None else f"{event.value:.3f}"
            self._show_rows([*self.rows, [event.number, event.state.lower(), value]])
        elif isinstance(event, hpo.Best):
            shown = {k: v for k, v in event.params.items() if k in _config.searched()}
            self._best.value = (f"Best so far: trial {event.trial}, mean Dice "
                                f"{event.value:.3f}\n" + ", ".join(
                                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in shown.items()))
        elif isinstance(event, engine.Waiting):
            self._status.value = f"Waiting for {event.running} trial(s) on other workers"
        elif isinstance(event, Notice):
            self._status.value = event.message
        elif isinstance(event, Step):
            self._owner._step_bar.max = max(event.total, 1)
            self._owner._step_bar.value = event.done

    def _show_rows(self, rows: list[list]) -> None:
        self.rows = rows
        self.table.value = {"data": rows, "index": list(range(len(rows))), "columns": COLUMNS}

    def _on_result(self, result: hpo.SearchResult) -> None:
        self.result = result
        c = result.counts
        verb = "Stopped" if result.stopped else "Finished"
        where = f"; best parameters in {result.best_path}" if result.best_path else ""
        self._status.value = (f"{verb}: {c.complete} complete, {c.pruned} pruned, "
                              f"{c.waiting + c.running} to do{where}")
        show_info(f"Hyperparameter search {verb.lower()}{where}")

    def _on_error(self, exc: Exception) -> None:
        report_error(self._status, "Hyperparameter search", exc)

    def _on_finished(self) -> None:
        self.worker = None
        self._start.text = "Start search"
