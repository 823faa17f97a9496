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

from napari_meshchop.data.folds import fold_ids
from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Notice
from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.plugin.widgets.export import add_export_button
from napari_meshchop.plugin.widgets.feedback import background_job, cohort_problem, report_error
from napari_meshchop.plugin.widgets.finetune import FinetuneSection
from napari_meshchop.plugin.widgets.layout import fit_dock
from napari_meshchop.plugin.widgets.paths import default_folder, elide_path
from napari_meshchop.plugin.widgets.segment import checkpoint_label, offer_checkpoint
from napari_meshchop.plugin.widgets.settings import SettingsForm, shown
from napari_meshchop.studies import engine, hpo, space
from napari_meshchop.training import config as _config
from napari_meshchop.training import probe
from napari_meshchop.training.config import TrainConfig
from napari_meshchop.training.fold import train
from napari_meshchop.training.loop import EpochEnd, Step, TrainResult

if TYPE_CHECKING:
    import napari



class LossPlot:
    """Training loss per step and validation Dice per epoch, in a matplotlib canvas drawn
    in the napari theme's colours, with whole-number steps."""

    MIN_SIZE = (240, 200)  # pixels: room for the axes' labels, so the layout always fits

    def __init__(self, theme: str = "dark"):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.figure = Figure(figsize=(4, 2.6), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumSize(*self.MIN_SIZE)
        self.loss_axes = self.figure.add_subplot(111)
        self.dice_axes = self.loss_axes.twinx()
        self.loss_axes.set_xlabel("step")
        self.loss_axes.set_ylabel("loss")
        self.dice_axes.set_ylabel("val Dice")
        self.dice_axes.set_ylim(0, 1)
        self.loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        (self.loss_line,) = self.loss_axes.plot([], [], lw=1)
        (self.dice_line,) = self.dice_axes.plot([], [], "o-", ms=5, lw=1.5, zorder=3)
        self.apply_theme(theme)
        self.clear()

    def apply_theme(self, name: str) -> None:
        """Colours from napari's theme ``name``: its background, text and accents."""
        from napari.utils.theme import get_theme

        theme = get_theme(name)
        background, text = theme.background.as_hex(), theme.text.as_hex()
        self.figure.set_facecolor(background)
        self.loss_axes.set_facecolor(background)
        self.loss_line.set_color(theme.icon.as_hex())
        self.dice_line.set_color(theme.warning.as_hex())
        for axes in (self.loss_axes, self.dice_axes):
            axes.tick_params(colors=text, which="both")
            axes.xaxis.label.set_color(text)
            for spine in axes.spines.values():
                spine.set_color(theme.secondary.as_hex())
        self.loss_axes.yaxis.label.set_color(theme.icon.as_hex())
        self.dice_axes.yaxis.label.set_color(theme.warning.as_hex())
        self.canvas.draw_idle()

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
        if self.steps:  # the Dice points at the last step stay inside the axes
            self.loss_axes.set_xlim(0, max(self.steps[-1], 1) * 1.04)
        self.canvas.draw_idle()


class TrainWidget(Container):
    BASIC = ("channels", "epochs", "device")  # the settings shown without "Advanced"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self._viewer = viewer
        self.worker = None
        self._stop = threading.Event()
        self.result: TrainResult | None = None
        self._data = elide_path(FileEdit(label="Data folder", mode="d",
                                         value=default_folder("arc")))
        self._outer = SpinBox(label="Outer fold", min=0, max=9, value=0)
        self._inner = SpinBox(label="Inner fold", min=0, max=9, value=0)
        self._full = CheckBox(text="Train on the full outer fold (no validation)")
        self._out = elide_path(FileEdit(label="Run folder", mode="d",
                                        value=default_folder("runs", "meshnet")))
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
        self.plot = LossPlot(viewer.theme)
        viewer.events.theme.connect(lambda event: self.plot.apply_theme(event.value))
        self.extend([inputs, self._full, self._resume, self._advanced, advanced, self._start,
                     Container(widgets=[self._epoch_bar, self._step_bar], labels=True),
                     self._status])
        self.native.layout().addWidget(self.plot.canvas)
        self.search = SearchSection(self)
        self._search_box = CheckBox(text="Search hyperparameters (ASHA)")
        self._search_box.changed.connect(lambda v: setattr(self.search, "visible", bool(v)))
        self.extend([self._search_box, self.search])
        self.finetune = FinetuneSection(viewer)
        self.finetune.visible = False
        self._finetune_box = CheckBox(text="Fine-tune a checkpoint on corrected masks")
        self._finetune_box.changed.connect(lambda v: setattr(self.finetune, "visible", bool(v)))
        self.extend([self._finetune_box, self.finetune])
        add_export_button(self, lambda: self.result.checkpoint if self.result else None,
                          "Export the trained model...")
        fit_dock(self, grow=self.plot.canvas)
        self._advanced.changed.connect(lambda v: setattr(advanced, "visible", bool(v)))
        self._full.changed.connect(lambda v: setattr(self._inner, "enabled", not v))
        self._start.clicked.connect(self.toggle)
        self._add_time_estimate()

    def field(self, name: str):
        """The field of setting ``name`` (training/config.py)."""
        return {**self.settings.fields, **self.advanced_settings.fields}[name]

    def config(self) -> TrainConfig:
        shape = (self._shape.value,) * 3 if self._preprocess.value == "ras-minmax" else None
        spec = PreprocessSpec(self._preprocess.value, **({"shape": shape} if shape else {}))
        return TrainConfig(
            **self.settings.values(), **self.advanced_settings.values(),
            preprocess=spec.to_dict(), data_dir=str(self._data.value),
            outer_fold=self._outer.value,
            inner_fold=None if self._full.value else self._inner.value,
            full_outer=self._full.value)

    # ------------------------------------------------------------ time estimate, presets

    def _add_time_estimate(self) -> None:
        """A line above Start with the time an epoch takes here (a one-step probe, run by
        Estimate), and the two one-click recipes: CPU-sized crops, or the paper's."""
        self.prober = None
        self._estimate = Label(value="Estimate: times one training step on this machine "
                               "and tells how long an epoch takes.")
        self._estimate.native.setWordWrap(True)
        self._probe = PushButton(text="Estimate")
        self._cpu_sized = PushButton(text="CPU-sized settings",
                                     tooltip=f"the paper's recipe on random {probe.CPU_CROP}^3 "
                                     "crops: about 64 times less work a step")
        self._paper = PushButton(text="Paper's recipe",
                                 tooltip="MeshNet-26 on whole 256^3 volumes, 50 epochs")
        row = Container(widgets=[self._probe, self._cpu_sized, self._paper],
                        layout="horizontal", labels=False)
        row.margins = (0, 0, 0, 0)
        at = self.index(self._start)
        self.insert(at, self._estimate)
        self.insert(at, row)
        self._probe.clicked.connect(self.estimate_time)
        self._cpu_sized.clicked.connect(lambda: self.apply_recipe(probe.cpu_sized(self.config())))
        self._paper.clicked.connect(lambda: self.apply_recipe(probe.paper_recipe(self.config())))

    def apply_recipe(self, config: TrainConfig) -> None:
        """Show ``config``'s recipe in the fields (a preset); the estimate is redone."""
        for name in set(probe.RECIPE) & set(shown()):
            value = getattr(config, name)
            self.field(name).value = 0 if value is None else value  # crop: 0 is "whole"
        what = f"random {config.crop}^3 crops" if config.crop else "whole volumes"
        self._estimate.value = f"Training on {what} (see Advanced). Press Estimate."

    def estimate_time(self) -> None:
        """Time one step in a worker (seconds); the line then says what an epoch takes."""
        if self.prober is not None or self.worker is not None:
            return
        try:
            config = self.config()
            subjects = self._fold_sizes(config)
        except (MeshchopError, ValueError) as exc:
            show_error(str(exc))
            return
        self._estimate.value = "Timing one training step..."
        self._probe.enabled = False
        self.prober = create_worker(
            probe.estimate, config, _start_thread=False,
            _connect={"returned": lambda found: self._show_estimate(found, config, subjects),
                      "errored": lambda exc: report_error(self._estimate, "Estimate", exc),
                      "finished": self._on_probed})
        self.prober.start()

    def _fold_sizes(self, config: TrainConfig) -> tuple[int, int] | None:
        """Training and validation subjects of the chosen fold, when the data is there."""
        if cohort_problem(config.data_dir):
            return None
        inner = None if config.full_outer else config.inner_fold
        n_train = len(fold_ids(config.data_dir, config.outer_fold, "train", inner))
        n_val = len(fold_ids(config.data_dir, config.outer_fold, "val", inner)) \
            if inner is not None else 0
        return n_train, n_val

    def _show_estimate(self, found: probe.Estimate, config: TrainConfig,
                       subjects: tuple[int, int] | None) -> None:
        edge = "x".join(str(s) for s in found.step_shape)
        step = f"{probe.duration(found.step_seconds)} a step on {edge} voxels"
        if subjects is None:
            self._estimate.value = (f"About {step} on {found.device}, "
                                    f"{probe.duration(found.validation_seconds)} to validate "
                                    "a subject (choose a downloaded cohort for the epoch).")
            return
        epoch = found.epoch_seconds(*subjects)
        self._estimate.value = (
            f"About {probe.duration(epoch)} an epoch on {found.device} ({subjects[0]} steps, "
            f"{step}; {subjects[1]} validation subjects); {config.epochs} epochs: "
            f"{probe.duration(epoch * config.epochs)}.")

    def _on_probed(self) -> None:
        self.prober = None
        self._probe.enabled = True

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
        if not self._resume.value and (problem := cohort_problem(config.data_dir)):
            self._status.value = problem
            show_error(problem)
            return
        self._stop = threading.Event()
        self.result = None
        self.plot.clear()
        self._epoch_bar.max = config.epochs
        self._epoch_bar.value = 0
        self.worker = background_job(
            self, train, config, Path(self._out.value), self._resume.value, self._stop)
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
        self._offer_to_segment(result, verb)

    def _offer_to_segment(self, result: TrainResult, verb: str) -> None:
        """The run's checkpoint becomes a Model choice of the Segment widget, labelled with
        its run and epoch; the user picks it (nothing changes by itself)."""
        label = checkpoint_label(result)
        offered = offer_checkpoint(self._viewer, result.checkpoint, label)
        where = (" It is a Model choice in the Segment widget: " + label) if offered else ""
        show_info(f"Training {verb.lower()}; checkpoint {result.checkpoint}.{where}")

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
        self.worker = background_job(
            self, hpo.search, config, Path(self._owner._out.value), self._trials.value, chosen,
            self._storage.value.strip() or None, self._study.value.strip() or space.STUDY,
            stop=self._stop)
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
