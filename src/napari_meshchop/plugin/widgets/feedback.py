"""How the widgets report progress and failure: one place, the same words everywhere."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from magicgui.widgets import Label
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error

from napari_meshchop.data import folds, manifest
from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Progress

log = logging.getLogger(__name__)

DOWNLOAD_WIDGET = "Plugins > MeshChop stroke lesions > Download ARC cohort"


def background_job(owner, function: Callable, *args, **kwargs):
    """``function(*args, **kwargs)``, a core job, as napari's thread worker, not started yet.

    Its yielded events go to ``owner._on_event``, what it returns to ``owner._on_result``,
    an exception to ``owner._on_error``; ``owner._on_finished`` runs however it ends. The
    handlers go in through ``_connect``: connected afterwards, superqt re-raises the job's
    errors.
    """
    return create_worker(function, *args, **kwargs, _start_thread=False, _connect={
        "yielded": owner._on_event, "returned": owner._on_result,
        "errored": owner._on_error, "finished": owner._on_finished})


def report_error(status: Label, what: str, exc: Exception) -> None:
    """Bad input or a refusal shows the core's own sentence; a bug keeps its traceback."""
    if isinstance(exc, MeshchopError):
        status.value = f"Error: {exc}"
        show_error(str(exc))
    else:
        log.error("%s failed", what, exc_info=exc)
        status.value = f"Failed: {type(exc).__name__}: {exc}"
        show_error(f"{what} failed ({type(exc).__name__}: {exc})")


def cohort_problem(folder: str | Path) -> str | None:
    """What stops a widget from using ``folder`` as a downloaded cohort, said as what to do
    in napari (the command line's messages name commands instead); None when it is ready."""
    folder = Path(folder).expanduser()
    if not manifest.path(folder).is_file():
        return (f"{folder} holds no downloaded ARC cohort (no manifest.json). Download it "
                f"with {DOWNLOAD_WIDGET}, or choose the folder you downloaded it to.")
    try:
        cohort = manifest.load(folder)
    except MeshchopError as exc:
        return str(exc)
    if not cohort.complete:
        return (f"The download into {folder} stopped part-way ({len(cohort.pending)} pairs "
                f"missing): press Start in {DOWNLOAD_WIDGET} to finish it.")
    if not (folder / folds.NAME).is_file():
        return (f"{folder} has no cross-validation folds yet: press Start in "
                f"{DOWNLOAD_WIDGET} (it makes them when the download is complete).")
    return None


def clock(seconds: float) -> str:
    """1:05, 12:40, 1:02:03."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Timer:
    """Elapsed time, and the time left estimated from the steps of one stage.

    ``stage`` names the events whose steps all cost about the same (the network's layers,
    the subjects of an evaluation); the time left is their mean duration so far times the
    steps still to go. ``now`` is a clock in seconds (tests pass their own).
    """

    def __init__(self, stage: str, now: Callable[[], float] = time.monotonic):
        self.stage = stage
        self._now = now
        self.started = now()
        self._first: tuple[float, int] | None = None  # the stage's first event: time, done
        self._last: tuple[float, int] | None = None
        self._total = 0

    def elapsed(self) -> float:
        return self._now() - self.started

    def remaining(self) -> float | None:
        """Seconds left, or None until two events of the stage have been seen."""
        if self._first is None or self._last is None or self._last[1] <= self._first[1]:
            return None
        (t0, n0), (t1, n1) = self._first, self._last
        return (t1 - t0) / (n1 - n0) * max(self._total - n1, 0)

    def update(self, event: Progress) -> str:
        """Record ``event``; the line to show: "0:42 elapsed, about 1:10 left"."""
        if event.stage == self.stage:
            now = self._now()
            if self._first is None:
                self._first = (now, event.done)
            self._last, self._total = (now, event.done), event.total
        left = self.remaining()
        text = f"{clock(self.elapsed())} elapsed"
        return text + (f", about {clock(left)} left" if left is not None else "")


class ActivityBar:
    """The job's bar in napari's activity panel (``napari.utils.progress``), kept in step
    with the widget's own bar; closed when the job ends, however it ends.

    Updating it redraws the panel, which may handle the job's next events first: update it
    last in an event handler."""

    def __init__(self, description: str):
        self._bar = progress(total=0, desc=description)

    def update(self, event: Progress) -> None:
        bar = self._bar  # napari may run the job's end (close) while the bar redraws
        if bar is None:
            return
        if event.total and bar.total != event.total:
            bar.total = event.total
        bar.set_description(f"{event.stage}: {event.message}".rstrip(": "))
        done = min(event.done, event.total)
        if done > bar.n:  # forward only: a redraw may have shown a later event already
            bar.update(done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
