"""Typed events that long work yields, and the helpers that drive such generators.

Long work (segmentation, training, evaluation) is a generator: it yields events,
checks a stop flag between steps and *returns* its result. :func:`run` drives one to its
end (the CLI's renderer in :mod:`napari_meshchop.cli.progress` and the tests use it; the
GUI hands the same generator to napari's ``thread_worker``); :func:`relay` passes one
job's events on, translated, from inside another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from napari_meshchop.errors import Cancelled

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of a staged job: ``done`` of ``total`` steps, now in ``stage``."""

    stage: str
    done: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class Notice:
    """Something the user should read (a fallback taken, a file skipped); not an error."""

    message: str


@dataclass(frozen=True)
class DownloadProgress(Progress):
    """A download's step: ``done`` of ``total`` items, and ``nbytes`` received so far."""

    nbytes: int = 0


# ---- training ----------------------------------------------------------------------

@dataclass(frozen=True)
class Step(Progress):
    """One optimizer step: ``done`` of ``total`` steps of the whole run."""

    epoch: int = 0
    loss: float = float("nan")
    lr: float = float("nan")


@dataclass(frozen=True)
class EpochEnd:
    epoch: int  # 0-based; epochs done = epoch + 1
    epochs: int
    train_loss: float
    val_dice: float | None
    seconds: float


@dataclass(frozen=True)
class CheckpointWritten:
    path: Path
    epoch: int
    step: int
    best: bool = False


# ---- many runs: the study engine, the experiment, the search ------------------------

@dataclass(frozen=True)
class Claimed:
    """A worker took a unit of a shared study."""

    number: int  # trial number
    origin: int  # the unit's first trial number
    unit: dict
    resumed: bool  # a retry of a unit another worker (or this one) left unfinished


@dataclass(frozen=True)
class Finished:
    """A unit ended on this worker."""

    number: int
    origin: int
    unit: dict
    state: str  # COMPLETE, PRUNED, FAIL, REQUEUED (stopped; back in the queue), LOST
    value: float | None
    seconds: float


@dataclass(frozen=True)
class Waiting:
    """Nothing left to claim here while other workers still run units."""

    running: int  # units running on other workers, which may still come back


@dataclass(frozen=True)
class RunProgress(Progress):
    """``done`` of ``total`` runs; ``message`` names the run starting or just done."""

    key: str = ""


@dataclass(frozen=True)
class TrialReport:
    """A trial's mean validation Dice after ``epoch`` epochs on every inner fold."""

    number: int
    epoch: int  # epochs done (1-based), the pruner's step
    epochs: int
    fold_dice: tuple[float, ...]
    mean: float


@dataclass(frozen=True)
class Best:
    """The best complete trial so far (written to best_params.json)."""

    trial: int
    value: float
    params: dict  # TrainConfig fields


StopFlag = Callable[[], bool] | threading.Event | None


def stop_requested(stop: StopFlag) -> bool:
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


def check_stop(stop: StopFlag) -> None:
    """Raise :class:`Cancelled` when the user asked to stop."""
    if stop_requested(stop):
        raise Cancelled()


def run(job: Generator[Any, None, T], on_event: Callable[[Any], None] | None = None) -> T:
    """Drive a job generator to its end and return what it returned."""
    while True:
        try:
            event = next(job)
        except StopIteration as finished:
            return finished.value
        if on_event is not None:
            on_event(event)


def relay(job: Generator[Any, None, T], translate: Callable[[Any], Any]
          ) -> Generator[Any, None, T]:
    """``yield from job`` with each event replaced by ``translate(event)``: dropped where
    that is None, several events where it is a list. Returns what ``job`` returned; closing
    the relay closes ``job``."""
    try:
        while True:
            try:
                event = next(job)
            except StopIteration as finished:
                return finished.value
            mapped = translate(event)
            if isinstance(mapped, list):
                yield from mapped
            elif mapped is not None:
                yield mapped
    finally:
        job.close()
