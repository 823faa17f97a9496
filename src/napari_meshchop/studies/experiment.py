"""The paper's experiment: outer folds x restarts, each run trained on the whole outer
training set for a fixed number of epochs and tested on the outer test set.

Runs are independent units, so that any engine can hand them out:

* :func:`plan` (pure) lists the runs (``fold0-restart3``; restart R has seed ``seed + R``);
* :func:`prepare` writes ``plan.json`` or checks that the folder holds this very plan;
* :func:`run_one` does one run and is idempotent: a complete run is skipped, an interrupted
  one resumes from its checkpoint (``train``'s resume), a stop leaves it resumable;
* :func:`run_all` is the local driver over any iterable of runs (another engine may pass
  the runs it was given, or call :func:`run_one` itself);
* :func:`ensemble_one` evaluates a fold's restarts as one ensemble (mean softmax);
* :func:`finish` evaluates the ensembles and writes the report (:mod:`report`);
  :func:`experiment` is all of it.

Layout of an experiment folder ``OUT``::

    plan.json                         the plan; another plan in the same folder is refused
    fold{K}/restart{R}/               the run's train folder: last.pt, config.json, metrics.jsonl
    fold{K}/restart{R}/results.json   per-subject results on fold K's test set, written last:
                                      a run is complete iff this file is valid
    fold{K}/ensemble/results.json     the fold's restarts as one ensemble (--ensemble)
    report.md, report.json            the aggregate, beside the paper's Table 1
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Generator, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from napari_meshchop import files
from napari_meshchop.errors import Cancelled, InputError, MeshchopError
from napari_meshchop.evaluation import evaluate
from napari_meshchop.events import Progress, StopFlag, check_stop
from napari_meshchop.training import loop as train
from napari_meshchop.training.loop import TrainConfig

PLAN = "plan.json"
FORMAT = "napari-meshchop/experiment"
ENSEMBLE = "ensemble"
# TrainConfig fields that say how a run is computed, not what: a later session (or another
# machine) may change them without changing the experiment.
HOW = ("device", "workers", "memory_gb", "activation_checkpointing")


@dataclass(frozen=True)
class Run:
    """One training run: outer fold ``fold``, restart ``restart`` (seed ``seed``)."""

    fold: int
    restart: int
    seed: int

    @property
    def key(self) -> str:
        return f"fold{self.fold}-restart{self.restart}"

    def folder(self, out: str | os.PathLike) -> Path:
        return Path(out) / f"fold{self.fold}" / f"restart{self.restart}"

    def identity(self) -> dict:
        """What its results.json records as its ``experiment`` entry."""
        return {"run": self.key, "fold": self.fold, "restart": self.restart, "seed": self.seed}


@dataclass(frozen=True)
class Plan:
    """The experiment: a recipe (``config.seed`` is restart 0's seed), folds, restarts."""

    config: TrainConfig
    folds: tuple[int, ...] = (0, 1, 2)
    restarts: int = 10
    folds_sha256: str = ""  # of the folds' train and test ids; set by prepare()

    @property
    def runs(self) -> list[Run]:
        return [Run(k, r, self.config.seed + r) for k in self.folds for r in range(self.restarts)]

    def run(self, key: str) -> Run:
        for run in self.runs:
            if run.key == key:
                return run
        raise MeshchopError(f"no run {key!r} in this experiment")

    def run_config(self, run: Run) -> TrainConfig:
        d = self.config.to_dict()
        d.update(seed=run.seed, outer_fold=run.fold, inner_fold=None, full_outer=True)
        return TrainConfig.from_dict(d)

    @property
    def data_dir(self) -> str:
        return self.config.data_dir

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "folds": list(self.folds),
                "restarts": self.restarts, "seeds": [r.seed for r in self.runs[:self.restarts]],
                "folds_sha256": self.folds_sha256, "config": self.config.to_dict(),
                "runs": [r.key for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(TrainConfig.from_dict(d["config"]), tuple(d["folds"]), int(d["restarts"]),
                   d.get("folds_sha256", ""))

    def identity(self) -> dict:
        """What makes two plans the same experiment."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in HOW}
        return {"folds": list(self.folds), "restarts": self.restarts,
                "folds_sha256": self.folds_sha256, **config}


def plan(config: TrainConfig, folds: Iterable[int] = (0, 1, 2), restarts: int = 10) -> Plan:
    """The runs of an experiment with ``config``'s recipe: every fold x ``restarts``."""
    folds = tuple(int(k) for k in folds)
    if restarts < 1:
        raise MeshchopError("restarts must be at least 1")
    if not folds or len(set(folds)) != len(folds) or min(folds) < 0:
        raise MeshchopError(f"folds must be distinct outer fold numbers, not {list(folds)}")
    d = config.to_dict()
    d.update(outer_fold=None, inner_fold=None, full_outer=True,
             data_dir=os.path.abspath(config.data_dir) if config.data_dir else "")
    return Plan(TrainConfig.from_dict(d), folds, int(restarts))


def load_plan(out: str | os.PathLike) -> Plan:
    _, raw = files.read_json(out, PLAN, FORMAT, "experiment plan",
                             "no experiment here (no plan.json); run `meshchop experiment` first")
    try:
        return Plan.from_dict(raw)
    except (KeyError, TypeError, ValueError, MeshchopError) as exc:
        raise InputError(Path(out) / PLAN, f"not a valid experiment plan ({exc})") from None


def prepare(out: str | os.PathLike, plan_: Plan) -> Plan:
    """Write ``OUT/plan.json``, or check that OUT holds this very experiment.

    Returns the plan to run: the saved one (with this session's device and other ``HOW``
    fields) when OUT already has one.
    """
    from napari_meshchop.data import folds as _folds

    if not plan_.data_dir:
        raise MeshchopError("the experiment needs a data folder (--data-dir)")
    made = _folds.load(plan_.data_dir)
    for k in plan_.folds:
        if not 0 <= k < made.outer_folds:
            raise MeshchopError(f"outer fold {k} does not exist in {plan_.data_dir} "
                                f"(0..{made.outer_folds - 1})")
    ids = [[made.outer[k].train, made.outer[k].test] for k in plan_.folds]
    plan_ = replace(plan_, folds_sha256=hashlib.sha256(json.dumps(ids).encode()).hexdigest())
    path = Path(out) / PLAN
    if not path.exists():
        files.write_json(path, plan_.to_dict())
        return plan_
    saved = load_plan(out)
    mine, theirs = plan_.identity(), saved.identity()
    differ = [f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now"
              if k != "folds_sha256" else "the data folder's folds are not those it started with"
              for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differ:
        raise InputError(path, "this folder holds another experiment ("
                         + "; ".join(differ) + "); use another --out, or give no recipe "
                         "flags to continue the one there")
    how = {k: getattr(plan_.config, k) for k in HOW}
    return replace(saved, config=replace(saved.config, **how))


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


@dataclass(frozen=True)
class RunProgress(Progress):
    """``done`` of ``total`` runs; ``message`` names the run starting or just done."""

    key: str = ""


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
    epoch in progress. ``plan_`` must have been through :func:`prepare`.
    """
    done = load_run(out, run)
    if done is not None:
        return done
    folder = run.folder(out)
    config = plan_.run_config(run)
    if device:
        config.device = device
    with files.exclusive(folder, "experiment run"):
        found, problems = train.find_resumable(folder)
        if found is None:  # else fit() reports the files it passes over itself
            for problem in problems:
                yield train.Notice(f"{run.key}: starting afresh; not resuming from {problem}")
        else:
            yield train.Notice(f"{run.key}: resuming")
        trained = yield from train.train(config, folder, resume=found is not None, stop=stop)
        if trained.stopped:
            raise Cancelled(f"stopped during {run.key}; it resumes from its checkpoint")
        ids = evaluate.fold_ids(plan_.data_dir, run.fold, "test")
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
    checkpoints = [r.folder(out) / train.LAST for r in members]
    ids = evaluate.fold_ids(plan_.data_dir, fold, "test")
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
    from napari_meshchop.evaluation import report

    if ensemble:
        for fold in plan_.folds:
            yield from ensemble_one(out, plan_, fold, device, stop)
    return report.write(out, compare)


def experiment(out: str | os.PathLike, plan_: Plan, runs: Iterable[Run] | None = None,
               device: str | None = None, ensemble: bool = False,
               compare: str | os.PathLike | None = None, stop: StopFlag = None):
    """:func:`prepare`, the runs (all of the plan's by default), then :func:`finish`."""
    plan_ = prepare(out, plan_)
    yield from run_all(out, plan_, runs, device, stop)
    return (yield from finish(out, plan_, ensemble, compare, device, stop))
