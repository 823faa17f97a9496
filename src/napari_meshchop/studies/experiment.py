"""The paper's experiment: outer folds x restarts, each run trained on the whole outer
training set for a fixed number of epochs and tested on the outer test set.

Runs are independent units, so that any engine can hand them out:

* :mod:`.plan` says what the experiment is (its runs, its ``plan.json``);
* :func:`run_one` does one run and is idempotent: a complete run is skipped, an interrupted
  one resumes from its checkpoint (``train``'s resume), a stop leaves it resumable;
* :func:`run_all` is the local driver over any iterable of runs (another engine may pass
  the runs it was given, or call :func:`run_one` itself);
* :func:`ensemble_one` evaluates a fold's restarts as one ensemble (mean softmax);
* :func:`finish` evaluates the ensembles and writes the report (:mod:`report`);
  :func:`experiment` is all of it, and :func:`shared` the same with the runs handed out
  to workers on several machines by the study engine (:mod:`.engine`).

Layout of an experiment folder ``OUT``::

    plan.json                         the plan; another plan in the same folder is refused
    fold{K}/restart{R}/               the run's train folder: last.pt, config.json, metrics.jsonl
    fold{K}/restart{R}/results.json   per-subject results on fold K's test set, written last:
                                      a run is complete iff this file is valid
    fold{K}/ensemble/results.json     the fold's restarts as one ensemble (--ensemble)
    report.md, report.json            the aggregate, beside the paper's Table 1
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from napari_meshchop import files
from napari_meshchop.data.folds import fold_ids
from napari_meshchop.errors import Cancelled, InputError, MeshchopError
from napari_meshchop.evaluation import evaluate, report
from napari_meshchop.events import (
    Notice,
    RunProgress,
    StopFlag,
    check_stop,
    relay,
)
from napari_meshchop.studies import engine
from napari_meshchop.studies.plan import FORMAT, Plan, Run, load_plan, settle
from napari_meshchop.training.fold import train
from napari_meshchop.training.state import LAST, find_resumable

ENSEMBLE = "ensemble"


# ---- one run --------------------------------------------------------------------------

@dataclass(frozen=True)
class RunResult:
    """A complete run: its per-subject records (``evaluate``'s rows) on the fold's test set."""

    run: Run
    path: Path  # its results.json
    records: list[dict]
    skipped: bool = False  # complete before this session

    def mean(self, metric: str = "dice") -> float:
        """The run's score: ``metric`` averaged over the test subjects that were scored."""
        values = [r[metric] for r in self.records  # saved records hold NaN as None
                  if not r.get("error") and r.get(metric) is not None]
        return sum(values) / len(values) if values else float("nan")


def load_results(folder: str | os.PathLike, identity: dict) -> tuple[Path, list[dict]] | None:
    """The records of ``folder/results.json`` when it is complete and for ``identity``
    (what was passed as its ``experiment`` entry); None otherwise."""
    try:
        path, raw = files.read_json(folder, evaluate.RESULTS_JSON, evaluate.FORMAT,
                                    "evaluation", "")
    except InputError:
        return None
    config = raw.get("config") or {}
    if not raw.get("complete") or config.get("experiment") != identity:
        return None
    return path, list(raw.get("records", []))


def load_run(out: str | os.PathLike, run: Run) -> RunResult | None:
    """The run's results if it is complete, else None."""
    found = load_results(run.folder(out), run.identity())
    return None if found is None else RunResult(run, found[0], found[1], skipped=True)


def run_one(out: str | os.PathLike, plan_: Plan, run: Run, device: str | None = None,
            stop: StopFlag = None) -> Generator[object, None, RunResult]:
    """Train ``run`` (or resume it) and evaluate it on its fold's test set.

    Idempotent: a complete run returns its saved results at once. A stop raises
    :class:`Cancelled` after a resumable checkpoint is written; a kill loses at most the
    epoch in progress. ``plan_`` must have been through :func:`~.plan.settle`.
    """
    done = load_run(out, run)
    if done is not None:
        return done
    folder = run.folder(out)
    config = plan_.run_config(run)
    if device:
        config.device = device
    with files.exclusive(folder, "experiment run"):
        found, problems = find_resumable(folder)
        if found is None:  # else fit() reports the files it passes over itself
            for problem in problems:
                yield Notice(f"{run.key}: starting afresh; not resuming from {problem}")
        else:
            yield Notice(f"{run.key}: resuming")
        trained = yield from train(config, folder, resume=found is not None, stop=stop)
        if trained.stopped:
            raise Cancelled(f"stopped during {run.key}; it resumes from its checkpoint")
        ids = fold_ids(plan_.data_dir, run.fold, "test")
        results = yield from evaluate.evaluate(trained.last, plan_.data_dir, ids,
                                               config.device, stop=stop)
        evaluate.write_results(folder, results, {
            "experiment": run.identity(), "checkpoint": str(trained.last),
            "data_dir": plan_.data_dir, "part": f"outer fold {run.fold} test"})
    return replace(load_run(out, run), skipped=False)


def run_all(out: str | os.PathLike, plan_: Plan, runs: Iterable[Run] | None = None,
            device: str | None = None, stop: StopFlag = None
            ) -> Generator[object, None, list[RunResult]]:
    """The local driver: :func:`run_one` for each of ``runs`` (default: all of the plan's).

    ``runs`` may be any iterable, e.g. one that claims runs from a shared queue as it goes.
    """
    runs = plan_.runs if runs is None else runs
    total = len(runs) if hasattr(runs, "__len__") else len(plan_.runs)
    results = []
    for i, run in enumerate(runs):
        check_stop(stop)
        yield RunProgress("runs", i, total, run.key, key=run.key)
        result = yield from run_one(out, plan_, run, device, stop)
        results.append(result)
        yield RunProgress("runs", i + 1, total, run.key, key=run.key)
    return results


# ---- ensembles ------------------------------------------------------------------------

def ensemble_folder(out: str | os.PathLike, fold: int) -> Path:
    return Path(out) / f"fold{fold}" / ENSEMBLE


def _ensemble_identity(plan_: Plan, fold: int) -> dict:
    return {"ensemble": f"fold{fold}",
            "members": [r.key for r in plan_.runs if r.fold == fold]}


def load_ensemble(out: str | os.PathLike, plan_: Plan, fold: int) -> list[dict] | None:
    found = load_results(ensemble_folder(out, fold), _ensemble_identity(plan_, fold))
    return None if found is None else found[1]


def ensemble_one(out: str | os.PathLike, plan_: Plan, fold: int, device: str | None = None,
                 stop: StopFlag = None) -> Generator[object, None, list[dict] | None]:
    """Evaluate fold ``fold``'s restarts as one ensemble (mean softmax) on its test set.

    Returns the records, or None while some of the fold's runs are not complete.
    """
    done = load_ensemble(out, plan_, fold)
    if done is not None:
        return done
    members = [r for r in plan_.runs if r.fold == fold]
    if any(load_run(out, r) is None for r in members):
        return None
    checkpoints = [r.folder(out) / LAST for r in members]
    ids = fold_ids(plan_.data_dir, fold, "test")
    folder = ensemble_folder(out, fold)
    with files.exclusive(folder, "ensemble evaluation"):
        results = yield from evaluate.evaluate(checkpoints, plan_.data_dir, ids,
                                               device or plan_.config.device, stop=stop)
        evaluate.write_results(folder, results, {
            "experiment": _ensemble_identity(plan_, fold),
            "checkpoints": [str(c) for c in checkpoints], "data_dir": plan_.data_dir,
            "part": f"outer fold {fold} test"})
    return load_ensemble(out, plan_, fold)


# ---- all of it --------------------------------------------------------------------------

def finish(out: str | os.PathLike, plan_: Plan, ensemble: bool = False,
           compare: str | os.PathLike | None = None, device: str | None = None,
           stop: StopFlag = None):
    """The ensembles (if asked) of the folds whose runs are all complete, then the report
    of whatever is done; return the report (a dict, what ``report.json`` holds)."""
    if ensemble:
        for fold in plan_.folds:
            yield from ensemble_one(out, plan_, fold, device, stop)
    return report.write(out, build_report(out, compare))


def build_report(out: str | os.PathLike, compare: str | os.PathLike | None = None) -> dict:
    """The report of the experiment in ``out`` from what it holds now (and of ``compare``'s,
    to compare with)."""
    plan_ = load_plan(out)
    done = {run.key: load_run(out, run) for run in plan_.runs}
    ensembles = {k: load_ensemble(out, plan_, k) for k in plan_.folds}
    other = None if compare is None else build_report(compare)
    return report.build(out, plan_, done, ensembles, other)


def experiment(out: str | os.PathLike, plan_: Plan, runs: Iterable[Run] | None = None,
               device: str | None = None, ensemble: bool = False,
               compare: str | os.PathLike | None = None, stop: StopFlag = None):
    """:func:`~.plan.settle`, the runs (all of the plan's by default), then :func:`finish`."""
    plan_ = settle(out, plan_)
    yield from run_all(out, plan_, runs, device, stop)
    return (yield from finish(out, plan_, ensemble, compare, device, stop))


# ---- the experiment's runs on the same queue -------------------------------------------------

STUDY = "meshchop-experiment"  # the study's default name with --storage


def shared(out: str | os.PathLike, plan, storage: str | os.PathLike,
           study_name: str = STUDY, ensemble: bool = False,
           compare: str | os.PathLike | None = None, device: str | None = None,
           heartbeat: int = engine.HEARTBEAT, grace: int | None = None,
           stop: StopFlag = None, poll: float | None = None) -> Generator:
    """The experiment's runs (:class:`~.plan.Plan`) as units of a shared study: each run
    is claimed by one worker at a time (:func:`run_one`: complete runs are skipped,
    interrupted ones resume from their checkpoint in ``out``); then the report of what
    ``out`` holds (with the ensembles once every run is complete). Returns the report."""
    plan = settle(out, plan)
    identity = {k: v for k, v in plan.identity().items() if k != "data_dir"}
    shared_storage = engine.open_storage(storage, heartbeat, grace)
    study, _ = engine.open_study(shared_storage, study_name,
                                 [{"run": r.key} for r in plan.runs],
                                 {"kind": FORMAT, "plan": identity})
    total = len(plan.runs)

    def run_unit(trial, halt):
        run = plan.run(engine.unit_of(trial)["run"])
        result = yield from run_one(out, plan, run, device, halt)
        dice = result.mean("dice")
        trial.set_user_attr("test_dice", dice if math.isfinite(dice) else None)
        return dice if math.isfinite(dice) else 0.0  # the study's value: test Dice

    running = None

    def translate(event):
        nonlocal running
        if isinstance(event, engine.Claimed):
            key = event.unit["run"]
            again = f" (resuming trial {event.origin}'s run)" if event.resumed else ""
            return [Notice(f"{key}: claimed as trial {event.number}{again}"),
                    RunProgress("runs", engine.counts(study).finished, total, key, key=key)]
        if isinstance(event, engine.Finished):
            key = event.unit["run"]
            done = [RunProgress("runs", engine.counts(study).finished, total, key, key=key)]
            if event.state not in ("COMPLETE", "REQUEUED"):
                done.append(Notice(f"{key}: {event.state.lower()} (trial {event.number})"))
            return done
        if isinstance(event, engine.Waiting):
            changed, running = event.running != running, event.running
            return Notice(f"waiting for {running} run(s) on other workers") if changed else None
        return event

    result = yield from relay(engine.work(shared_storage, study, run_unit, stop, poll), translate)
    if result.stopped:
        raise Cancelled("stopped; the interrupted run resumes from its checkpoint")
    everything = result.counts.complete == total
    try:
        return (yield from finish(out, plan, ensemble and everything, compare,
                                             device, stop))
    except Cancelled:
        raise
    except MeshchopError as exc:  # another worker is evaluating an ensemble right now
        if "is writing here" not in str(exc):  # files.exclusive's refusal
            raise
        yield Notice(f"ensembles left to the other worker ({exc})")
        return (yield from finish(out, plan, False, compare, device, stop))
