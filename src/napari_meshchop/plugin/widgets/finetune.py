"""The Fine-tune section: a checkpoint learns from a folder of corrected pairs.

It runs :func:`training.finetune.finetune` (what ``meshchop finetune`` runs) in a thread
worker: Start becomes Stop (a resumable checkpoint is left), progress arrives in
``yielded``; in ``returned`` a table shows each held-out pair's lesion Dice with the old and
the new checkpoint and the change, and the new checkpoint is offered to the Segment widget
as its model. The section is a self-contained Container, for the Train widget to embed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    Table,
)
from napari.utils.notifications import show_error, show_info

from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Notice, Progress
from napari_meshchop.network import registry
from napari_meshchop.plugin.widgets.feedback import background_job, report_error
from napari_meshchop.plugin.widgets.lesions import DEFAULT_DATA_DIR
from napari_meshchop.plugin.widgets.segment import checkpoint_label, offer_checkpoint
from napari_meshchop.plugin.widgets.settings import SettingsForm
from napari_meshchop.training.config import FINETUNE, TrainConfig
from napari_meshchop.training.finetune import (
    FinetuneResult,
    default_fold,
    finetune,
    finetune_config,
    resume_config,
)
from napari_meshchop.training.loop import EpochEnd, Step

if TYPE_CHECKING:
    import napari

CHECKPOINT = "checkpoint file..."
COLUMNS = ["pair", "Dice before", "Dice after", "change"]
SHOWN = ("epochs", "lr", "crop", "device")  # the settings this section offers


class FinetuneSection(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self._viewer = viewer
        self.worker = None
        self.result: FinetuneResult | None = None
        self._stop = threading.Event()
        self._model = ComboBox(label="Start from", choices=[*registry.names("model"),
                                                             CHECKPOINT])
        self._checkpoint = FileEdit(label="Checkpoint", mode="r", filter="*.pt *.pth",
                                    visible=False)
        self._data = FileEdit(label="Corrected pairs", mode="d", value=DEFAULT_DATA_DIR,
                              tooltip="a folder made by 'Add to my training set' (or "
                              "`meshchop add-correction`)")
        self._out = FileEdit(label="Run folder", mode="d", value=Path("runs") / "finetune")
        self.settings = SettingsForm(SHOWN)
        for name, widget in self.settings.fields.items():
            if name in FINETUNE:
                widget.value = FINETUNE[name]
        self._hold_out = CheckBox(text="Hold out outer fold 0 for before and after",
                                  value=True)
        self._resume = CheckBox(text="Resume the run in the folder")
        self._start = PushButton(text="Start fine-tuning")
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        self.table = Table(value={"data": [], "columns": COLUMNS})
        self.extend([Container(widgets=[self._model, self._checkpoint, self._data,
                                        self._out], labels=True),
                     self.settings, self._hold_out, self._resume, self._start,
                     self._progress, self._status, self.table])
        self._model.changed.connect(
            lambda v: setattr(self._checkpoint, "visible", v == CHECKPOINT))
        self._start.clicked.connect(self.toggle)

    def model(self) -> str:
        if self._model.value != CHECKPOINT:
            return self._model.value
        path = Path(self._checkpoint.value)
        if not path.is_file():
            raise MeshchopError("choose a checkpoint file (.pt) to start from")
        return str(path)

    def config(self) -> TrainConfig:
        if self._resume.value:  # the run's own recipe; this session's device
            return resume_config(device=self.settings.values()["device"])
        data = Path(self._data.value)
        fold = default_fold(data) if self._hold_out.value else None
        return finetune_config(self.model(), data, fold, **self.settings.values())

    def toggle(self) -> None:
        """Start, or, while running, Stop (after the current step, leaving a checkpoint)."""
        if self.worker is None:
            self.start()
        else:
            self._stop.set()
            self._status.value = "Stopping after this step..."

    def start(self) -> None:
        try:
            config = self.config()
        except (MeshchopError, ValueError) as exc:
            show_error(str(exc))
            return
        self._stop = threading.Event()
        self.result = None
        self._show_rows([])
        self.worker = background_job(
            self, finetune, config, Path(self._out.value), self._resume.value, self._stop)
        self._start.text = "Stop"
        self._status.value = "Fine-tuning..."
        self.worker.start()

    def _on_event(self, event) -> None:
        if isinstance(event, Progress):
            self._progress.max = max(event.total, 1)
            self._progress.value = min(event.done, event.total)
            loss = f": loss {event.loss:.4f}" if isinstance(event, Step) else ""
            self._status.value = f"{event.stage} {event.message}{loss}".strip()
        elif isinstance(event, EpochEnd):
            self._status.value = (f"epoch {event.epoch + 1}/{event.epochs}: loss "
                                  f"{event.train_loss:.4f}")
        elif isinstance(event, Notice):
            self._status.value = event.message

    def _on_result(self, result: FinetuneResult) -> None:
        self.result = result
        trained = result.training
        verb = "Stopped" if trained.stopped else "Finished"
        text = f"{verb} after {trained.epochs_done} epochs; {result.checkpoint}"
        if result.comparison is not None:
            c = result.comparison
            self._show_rows([[ch.subject, _num(ch.score("before")), _num(ch.score("after")),
                              _num(ch.dice_change, signed=True)] for ch in c.changes]
                            + [["mean", _num(c.mean("before")), _num(c.mean("after")),
                                _num(c.mean_change, signed=True)]])
            text += (f". Held-out lesion Dice {c.mean('before'):.3f} -> "
                     f"{c.mean('after'):.3f}")
        elif not trained.stopped:
            text += ". Nothing was held out, so there is no before and after."
        self._status.value = text
        if not trained.stopped:
            offer_checkpoint(self._viewer, result.checkpoint,
                             "fine-tuned: " + checkpoint_label(result.training))
            show_info(f"Fine-tuned checkpoint {result.checkpoint} is the Segment widget's "
                      "model now")

    def _show_rows(self, rows: list[list]) -> None:
        self.table.value = {"data": rows, "index": [str(r[0]) for r in rows],
                            "columns": COLUMNS}

    def _on_error(self, exc: Exception) -> None:
        report_error(self._status, "Fine-tuning", exc)

    def _on_finished(self) -> None:
        self.worker = None
        self._start.text = "Start fine-tuning"


def _num(value: float, signed: bool = False) -> str:
    if value != value:  # NaN: an undefined Dice (no lesion in truth and prediction)
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"
