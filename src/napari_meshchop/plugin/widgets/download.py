"""The Download widget: fetch the paper's ARC cohort into a folder, with Start/Stop.

It runs :func:`arc.download` (a generator) in a thread worker. The worker touches no
widget: progress arrives in ``yielded`` and the result in ``returned``, both handled here on
the main thread. Stop sets a flag that the download checks between rows and files; what is
on disk stays complete, and Start resumes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
)
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QSettings
from qtpy.QtGui import QFontDatabase

from napari_meshchop.data import arc, folds
from napari_meshchop.data.manifest import REASONS, Manifest
from napari_meshchop.errors import Cancelled
from napari_meshchop.events import DownloadProgress, Progress
from napari_meshchop.plugin.widgets.feedback import background_job, report_error
from napari_meshchop.plugin.widgets.layout import fit_dock
from napari_meshchop.plugin.widgets.paths import default_folder, elide_path

if TYPE_CHECKING:
    import napari

STAGES = {"scan": "Scanning sessions", "verify": "Checking files already on disk",
          "download": "Downloading pairs"}


def lesion_histogram(manifest: Manifest, width: int = 24) -> list[str]:
    """Pairs per lesion-size bin (the paper's, in voxels), as text bars."""
    counts = [0] * (len(folds.BIN_EDGES) - 1)
    for pair in manifest.pairs:
        counts[folds.size_bin(pair.lesion_voxels)] += 1
    top = max(counts) or 1
    labels = [folds.bin_label(i) for i in range(len(counts))]
    pad = max(len(label) for label in labels)
    return [f"{label:>{pad}} {'█' * round(width * n / top):<{width}} {n}"
            for label, n in zip(labels, counts, strict=True)]


def cohort_report(manifest: Manifest) -> str:
    acq = "\n".join(f"  {name:<15} {n}" for name, n in manifest.by_acquisition().items())
    excluded = "\n".join(f"  {n:>4} {REASONS.get(r, r)}"
                         for r, n in manifest.excluded_by_reason().items())
    return (f"{len(manifest.pairs)} pairs by acquisition:\n{acq}\n"
            f"Lesion size (voxels):\n" + "\n".join("  " + line for line in
                                                  lesion_histogram(manifest))
            + f"\nExcluded sessions:\n{excluded}")


class DownloadWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer, source: Any = None):
        super().__init__(labels=False)
        self._viewer = viewer
        self._source = source  # a datasets object or local copy instead of the hub (tests)
        self.worker = None
        self.result: arc.DownloadResult | None = None
        self._stop = threading.Event()
        self._repo = LineEdit(label="Repository", value=arc.REPO,
                              tooltip="Hugging Face dataset id, or a local copy laid out like it")
        self._revision = LineEdit(label="Revision", value="",
                                  tooltip="branch, tag or commit; empty for main")
        self._folder = elide_path(FileEdit(label="Destination", mode="d",
                                           value=str(default_folder("arc"))))
        self._start = PushButton(text="Start")
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._status = _wrapping_label(
            "Fetches the sessions with a lesion mask and a SPACE T2w (about 25 GB) and "
            "writes them with a manifest and cross-validation folds. Stop and Start "
            "again to resume.")
        self._summary = Label(value="")
        self._summary.native.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        inputs = Container(widgets=[self._repo, self._revision, self._folder], labels=True)
        self.extend([inputs, self._start, self._progress, self._status, self._summary])
        fit_dock(self)
        self._start.clicked.connect(self.toggle)
        self._restore_settings()

    # ----------------------------------------------------------------- running

    def toggle(self) -> None:
        if self.worker is None:
            self.start()
        else:
            self.stop()

    def start(self) -> None:
        """Start (or resume) the download; returns at once, the worker runs on."""
        if self.worker is not None:
            return
        repo = self._repo.value.strip()
        if not repo:
            show_error("give a repository id")
            return
        folder = Path(self._folder.value).expanduser()
        self._save_settings()
        self._stop = threading.Event()
        self.result = None
        self.worker = background_job(
            self, arc.download, folder, repo, self._revision.value.strip() or None,
            self._source, self._stop)
        self._set_running(True)
        self._summary.value = ""
        self._status.value = f"Opening {repo}..."
        self.worker.start()

    def stop(self) -> None:
        """Ask the download to stop at its next row or file."""
        if self.worker is not None:
            self._stop.set()
            self._start.enabled = False
            self._status.value = "Stopping..."

    def _on_event(self, event) -> None:
        if not isinstance(event, Progress):
            return
        self._progress.max = max(event.total, 1)
        self._progress.value = min(event.done, event.total)
        unit = "pairs" if event.stage in ("verify", "download") else "sessions"
        text = f"{STAGES.get(event.stage, event.stage)}: {event.done} of {event.total} {unit}"
        if isinstance(event, DownloadProgress):
            text += f", {arc.human_bytes(event.nbytes)} so far"
        self._status.value = f"{text} ({event.message})" if event.message else text

    def _on_result(self, result: arc.DownloadResult) -> None:
        self.result = result
        self._status.value = "\n".join(result.summary())
        self._summary.value = cohort_report(result.manifest)

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled):
            self._status.value = ("Stopped. Every file on disk is complete; Start again to "
                                  "resume.")
            show_info("ARC download stopped")
        else:
            report_error(self._status, "ARC download", exc)

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self._start.text = "Stop" if running else "Start"
        self._start.enabled = True
        for widget in (self._repo, self._revision, self._folder):
            widget.enabled = not running

    # ----------------------------------------------------------------- settings

    def _restore_settings(self) -> None:
        settings = QSettings("napari-meshchop", "download")
        folder = settings.value("folder", "")
        if folder:
            self._folder.value = folder

    def _save_settings(self) -> None:
        QSettings("napari-meshchop", "download").setValue("folder", str(self._folder.value))


def _wrapping_label(text: str = "") -> Label:
    label = Label(value=text)
    label.native.setWordWrap(True)
    return label
