"""Hyperparameter search as in the paper: asynchronous successive halving (ASHA).

Each trial trains MeshNet on every inner fold of one outer fold, the folds interleaved
epoch by epoch, and reports the mean validation lesion Dice after each epoch; Optuna's
``SuccessiveHalvingPruner`` stops a trial at a rung (``min_epochs`` x 3^k epochs) when it
is not in the top third there, so that pruning compares trials after equal training.
The sampler is TPE (seed 42). The objective is the mean validation Dice after the last
epoch (``max_epochs``, which is also the length of the OneCycle schedule of every trial).

The trials are units of :mod:`engine`: a fixed number of them, enqueued once, claimed by
any number of workers (``meshchop hpo`` on one machine or many, sharing ``--storage``),
retried from their checkpoints when a worker dies. The best parameters are written as
JSON that ``meshchop train --params`` and ``meshchop experiment --params`` read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import Path

from napari_meshchop import __version__, files
from napari_meshchop.data import folds as _folds
from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.events import Best, Notice, StopFlag, TrialReport, relay
from napari_meshchop.studies import engine
from napari_meshchop.studies.space import (
    MIN_EPOCHS,
    REDUCTION_FACTOR,
    STUDY,
    TRIALS,
    Space,
    recipe,
)
from napari_meshchop.training.config import TrainConfig
from napari_meshchop.training.fold import train
from napari_meshchop.training.loop import EpochEnd
from napari_meshchop.training.state import find_resumable

JOURNAL = "study.journal"  # the default storage, in the output folder
BEST = "best_params.json"
TRIALS_DIR = "trials"  # trials/<NNN>/inner<J>/: the training runs of each trial
KIND = "napari-meshchop/hpo"
# ---- events and result -------------------------------------------------------------------

@dataclass
class SearchResult:
    study: str
    storage: str  # without a password
    best: dict | None  # the content of best_params.json
    best_path: Path | None
    counts: engine.Counts
    stopped: bool
    finished: list[engine.Finished] = field(default_factory=list)


# ---- one trial -------------------------------------------------------------------------------

def _dice(value) -> float:
    """A diverged run's NaN Dice counts as 0."""
    return 0.0 if value is None or math.isnan(value) else float(value)


def run_trial(trial, stop: StopFlag, base: TrainConfig, space: Space, out_dir: Path,
              inner_folds: int) -> Generator:
    """Train one trial on every inner fold, interleaved by epoch; report, prune; return
    the mean validation Dice of the last epoch. Resumes the folds' runs it finds."""
    import optuna

    config = replace(base, **space.suggest(trial))
    folder = Path(out_dir) / TRIALS_DIR / f"{engine.origin(trial):03d}"
    with files.exclusive(folder, "worker of this trial"):
        dice: list[dict[int, float]] = [{} for _ in range(inner_folds)]
        jobs = []
        for j in range(inner_folds):
            run_dir = folder / f"inner{j}"
            found, _ = find_resumable(run_dir)
            if found is not None:
                for record in found.training.get("history", []):
                    dice[j][record["epoch"]] = _dice(record["val_dice"])
            jobs.append(train(replace(config, inner_fold=j), run_dir,
                                    resume=found is not None, stop=stop))
        reported = set(engine.frozen(trial).intermediate_values)  # by earlier workers
        live = list(range(inner_folds))
        try:
            while live:
                # The fold with the fewest epochs goes next: the folds advance together.
                j = min(live, key=lambda k: (len(dice[k]), k))
                while True:
                    try:
                        event = next(jobs[j])
                    except StopIteration as end:
                        if end.value.stopped:
                            raise Cancelled() from None
                        live.remove(j)
                        break
                    if isinstance(event, EpochEnd):
                        dice[j][event.epoch] = _dice(event.val_dice)
                        break
                    yield event
                common = set.intersection(*(set(d) for d in dice))
                for epoch in sorted(e for e in common if e + 1 not in reported):
                    scores = tuple(d[epoch] for d in dice)
                    mean = sum(scores) / len(scores)
                    trial.report(mean, epoch + 1)
                    reported.add(epoch + 1)
                    yield TrialReport(trial.number, epoch + 1, config.epochs, scores, mean)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"mean validation Dice {mean:.3f} after "
                                                 f"{epoch + 1} epochs")
        finally:
            for job in jobs:
                job.close()
    last = [d.get(config.epochs - 1) for d in dice]
    if any(v is None for v in last):
        raise MeshchopError(f"{folder}: a fold's run ended before {config.epochs} epochs")
    trial.set_user_attr("fold_dice", last)
    return sum(last) / len(last)


# ---- the search ------------------------------------------------------------------------------

def sampler(seed: int = 42):
    import optuna

    # constant_liar: a worker does not propose the point another is still training.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def pruner(min_epochs: int = MIN_EPOCHS, reduction_factor: int = REDUCTION_FACTOR):
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs,
                                                  reduction_factor=reduction_factor)


def best_params(study, space: Space) -> dict | None:
    """The best complete trial's parameters as a ``--params`` file's content."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value)
    meta = study.user_attrs.get("meta", {})
    c = engine.counts(study)
    return {
        "params": {**meta.get("recipe", {}), **space.config_fields(best.params)},
        "value": best.value,
        "metric": "mean validation lesion Dice over the inner folds",
        "fold_dice": best.user_attrs.get("fold_dice"),
        "trial": best.number,
        "study": study.study_name,
        "outer_fold": meta.get("outer_fold"),
        "inner_folds": meta.get("inner_folds"),
        "trials": {"planned": c.planned, "complete": c.complete, "pruned": c.pruned},
        "space": meta.get("space"),
        "source": f"napari-meshchop {__version__} hpo",
    }


def search(base: TrainConfig, out_dir: str | os.PathLike, trials: int = TRIALS,
           space: Space | None = None, storage: str | os.PathLike | None = None,
           study_name: str = STUDY, reduction_factor: int = REDUCTION_FACTOR, seed: int = 42,
           heartbeat: int = engine.HEARTBEAT, grace: int | None = None,
           stop: StopFlag = None, poll: float | None = None, wait: bool = True
           ) -> Generator:
    """Run (or join) a search on the inner folds of ``base.outer_fold`` of
    ``base.data_dir``; yield engine and training events; return a :class:`SearchResult`.

    ``storage`` is a journal file (default ``out_dir/study.journal``) or a database URL;
    workers that give the same storage and study name share the trials.
    """
    space = space or Space()
    out_dir = Path(out_dir)
    if base.outer_fold is None:
        raise MeshchopError("choose an outer fold")
    if trials < 1:
        raise MeshchopError("the number of trials must be at least 1")
    made = _folds.load(base.data_dir)
    made.outer_fold(base.outer_fold)
    inner = made.inner_folds
    where = storage if storage is not None else out_dir / JOURNAL
    meta = {"kind": KIND, "outer_fold": base.outer_fold, "inner_folds": inner,
            "cohort_sha256": made.cohort_sha256, "space": space.to_dict(),
            "reduction_factor": reduction_factor, "recipe": recipe(base)}
    out_dir.mkdir(parents=True, exist_ok=True)
    tpe = sampler(seed)
    storage = engine.open_storage(where, heartbeat, grace)
    study, created = engine.open_study(
        storage, study_name, [{"slot": i} for i in range(trials)], meta, tpe,
        pruner(space.min_epochs, reduction_factor))
    planned = engine.counts(study).planned
    if not created:
        tpe.reseed_rng()  # seed 42 stays with the study's first worker
        yield Notice(f"joined study {study_name!r} ({planned} trials planned)"
                           + (f"; --trials {trials} is ignored" if planned != trials else ""))

    def unit(trial, halt):
        return run_trial(trial, halt, base, space, out_dir, inner)

    best_path = out_dir / BEST

    def with_best(event):  # a trial complete: the best so far on disk, and said
        if isinstance(event, engine.Finished) and event.state == "COMPLETE":
            best = _write_best(study, space, best_path, where)
            return [event, Best(best["trial"], best["value"], best["params"])]
        return event

    result = yield from relay(engine.work(storage, study, unit, stop, poll, wait), with_best)
    best = _write_best(study, space, best_path, where)
    return SearchResult(study_name, engine.redact(where), best,
                        best_path if best is not None else None, result.counts,
                        result.stopped, result.finished)


def _write_best(study, space: Space, path: Path, where) -> dict | None:
    best = best_params(study, space)
    if best is not None:
        best["storage"] = engine.redact(where)
        files.write_json(path, best)
    return best
