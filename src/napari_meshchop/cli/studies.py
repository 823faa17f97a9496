"""``meshchop experiment`` and ``hpo``: many runs, on one machine or shared by several."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from napari_meshchop.cli.data import DATA_DIR, add_data_dir
from napari_meshchop.cli.progress import StopOnCtrlC, drive
from napari_meshchop.cli.train import add_recipe_flags, flag, train_config
from napari_meshchop.data import folds as _folds
from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.events import (
    Best,
    Claimed,
    Finished,
    RunProgress,
    TrialReport,
    Waiting,
)
from napari_meshchop.studies import engine, plan, space
from napari_meshchop.training import config as _config


def add_heartbeat_flags(p: argparse.ArgumentParser, unit: str, prefix: str = "") -> None:
    """How a shared study tells a dead worker (engine.py), for `experiment` and `hpo`."""
    p.add_argument("--heartbeat", type=int, default=engine.HEARTBEAT, help=f"{prefix}seconds "
                   f"between a worker's heartbeats (default {engine.HEARTBEAT})")
    p.add_argument("--grace", type=int, default=None, help=f"{prefix}seconds without a "
                   f"heartbeat after which a worker's {unit} is retried (default "
                   f"{engine.GRACE_BEATS} heartbeats)")


def register(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("experiment", help="the paper's protocol: outer folds x restarts, each "
                       "trained on the whole outer training set and tested on the outer test "
                       "set; a report beside the paper's Table 1; resumable")
    x.add_argument("--out", required=True, help="experiment folder: plan.json, "
                   "fold{K}/restart{R}/ (run folders with results.json), report.md, "
                   "report.json; run again to continue")
    add_data_dir(x, default=None)
    x.add_argument("--restarts", type=int, default=None,
                   help=f"runs per fold, seeds SEED..SEED+N-1 (default {plan.RESTARTS})")
    x.add_argument("--folds", type=int, nargs="+", default=None, metavar="K",
                   help="outer folds to run (default all)")
    x.add_argument("--ensemble", action="store_true", help="also score each fold's restarts "
                   "as one ensemble (the mean of their lesion probabilities)")
    x.add_argument("--compare", default=None, metavar="OTHER_OUT",
                   help="another experiment folder: paired Wilcoxon signed-rank tests per "
                   "subject, Holm-corrected, in the report")
    x.add_argument("--report-only", action="store_true",
                   help="train nothing: aggregate the runs done so far and write the report")
    x.add_argument("--storage", default=None, help="share the runs with other workers "
                   "through a study: a database URL (postgresql://user:password@host/db) "
                   "or a journal file for processes on one machine; every worker runs the "
                   "same command (see docs/hpo.md)")
    x.add_argument("--study", default="meshchop-experiment",
                   help="study name with --storage (default meshchop-experiment)")
    add_heartbeat_flags(x, "run", "with --storage: ")
    add_recipe_flags(x)
    x.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    x.set_defaults(func=experiment)

    h = sub.add_parser("hpo", help="search hyperparameters with asynchronous successive "
                       "halving (ASHA) on the inner folds of an outer fold; workers on many "
                       "machines share one study")
    add_data_dir(h)
    h.add_argument("--outer-fold", type=int, default=0,
                   help="K: search on its inner folds (default 0)")
    h.add_argument("--trials", type=int, default=space.TRIALS,
                   help=f"trials in the study (set by its first worker; default {space.TRIALS})")
    h.add_argument("--out", required=True, help="folder: best_params.json, trials/NNN/ (the "
                   "trials' runs; share it between machines to resume a dead worker's trial), "
                   "study.journal (the default storage)")
    h.add_argument("--storage", default=None, help="where the study lives: a journal file "
                   "(default OUT/study.journal) or a database URL shared by several machines, "
                   "e.g. postgresql://user:password@host/db")
    h.add_argument("--study", default=space.STUDY, help=f"study name (default {space.STUDY})")
    h.add_argument("--min-epochs", type=int, default=space.MIN_EPOCHS,
                   help=f"ASHA's minimum resource: the first rung (default {space.MIN_EPOCHS})")
    h.add_argument("--max-epochs", type=int, default=space.MAX_EPOCHS, help="epochs of a full "
                   f"trial and of its OneCycle schedule (default {space.MAX_EPOCHS})")
    h.add_argument("--reduction-factor", type=int, default=space.REDUCTION_FACTOR,
                   help=f"ASHA keeps the top 1/N at each rung (default {space.REDUCTION_FACTOR})")
    add_space_flags(h)
    h.add_argument("--sampler-seed", type=int, default=42,
                   help="TPE's seed, used by the study's first worker (default 42)")
    add_heartbeat_flags(h, "trial")
    add_recipe_flags(h)
    h.add_argument("-q", "--quiet", action="store_true", help="no progress")
    h.set_defaults(func=hpo)


def add_space_flags(p: argparse.ArgumentParser) -> None:
    """A --NAME-range (or --NAME-choices) flag for every searched setting."""
    bounds = space.Space().bounds
    for param, (name, search) in space.dimensions().items():
        _, s = _config.settings()[name]
        what = {"int": "integer", "log": "log-uniform", "uniform": "uniform"}.get(search.kind)
        shown = " ".join(map(str, bounds[param]))
        if search.choices:
            p.add_argument(search.flag(), dest=f"space_{param}", type=float, nargs="+",
                           default=bounds[param], metavar="VALUE",
                           help=f"{s.help}: the values tried (default {shown})")
        else:
            p.add_argument(search.flag(), dest=f"space_{param}", nargs=2,
                           type=int if search.kind == "int" else float, default=bounds[param],
                           metavar=("LOW", "HIGH"), help=f"{s.help}"
                           + (f", element {search.index}" if search.index is not None else "")
                           + f", {what} (default {shown})")


def experiment(args) -> int:
    """Run (or continue) the paper's protocol and write its report; or only the report."""
    from napari_meshchop.evaluation import report  # deferred: torch
    from napari_meshchop.studies import experiment as protocol
    from napari_meshchop.training import lean

    lean.claim_allocator()  # this process exists to train: it may keep its heap lean
    out = Path(args.out)
    if args.report_only:  # ensembles (evaluation only) and the report; no training
        doc = drive(protocol.finish(out, plan.load_plan(out), args.ensemble, args.compare,
                                    args.device), args.quiet)
        print(report.markdown(doc), end="")
        print(f"\nreport written to {out / report.REPORT_MD} and {out / report.REPORT_JSON}")
        return 0
    planned = _asked_plan(args, out)
    with StopOnCtrlC() as stop:
        if args.storage:  # runs shared with other workers through a study (engine.py)
            job = protocol.shared(out, planned, args.storage, args.study, args.ensemble,
                                  args.compare, heartbeat=args.heartbeat, grace=args.grace,
                                  stop=stop)
        else:
            job = protocol.experiment(out, planned, ensemble=args.ensemble,
                                      compare=args.compare, stop=stop)
        resume = f"meshchop experiment --out {args.out}" + (
            f" --storage {engine.redact(args.storage)} --study {args.study}"
            if args.storage else "")
        try:
            doc = drive(job, args.quiet, outer=RunProgress)
        except (Cancelled, KeyboardInterrupt):
            print(f"meshchop: stopped; complete runs are kept and an interrupted one resumes "
                  f"from its checkpoint: run `{resume}` to continue", file=sys.stderr)
            return 130
    print(report.markdown(doc), end="")
    print(f"\nreport written to {out / report.REPORT_MD} and {out / report.REPORT_JSON}")
    return 0


def _asked_plan(args, out: Path) -> plan.Plan:
    """The plan the flags ask for; with no recipe flags, the one saved in --out (to continue
    it) with this session's machine settings."""
    given = getattr(args, "given", set()) - set(plan.HOW)
    asked = (given or args.params or args.restarts is not None or args.folds is not None
             or args.data_dir is not None)
    data_dir = args.data_dir or DATA_DIR
    config = train_config(args, data_dir=data_dir)
    if (out / plan.PLAN).is_file() and not asked:
        saved = plan.load_plan(out)
        how = {k: getattr(config, k) for k in plan.HOW}
        return replace(saved, config=replace(saved.config, **how))
    fold_list = args.folds
    if fold_list is None:
        fold_list = range(_folds.load(data_dir).outer_folds)
    return plan.plan(config, fold_list, plan.RESTARTS if args.restarts is None else args.restarts)


def hpo(args) -> int:
    """Search hyperparameters with ASHA on the inner folds of an outer fold, or join a
    search that workers on this or other machines share (same --storage and --study)."""
    from napari_meshchop.studies import hpo as search  # deferred: torch, Optuna
    from napari_meshchop.training import lean

    lean.claim_allocator()  # this process exists to train: it may keep its heap lean
    searched = sorted(getattr(args, "given", set()) & set(_config.searched()))
    if searched:
        flags = ", ".join(flag(name) for name in searched)
        ranges = ", ".join(s.flag() for _, s in space.dimensions().values())
        raise MeshchopError(f"meshchop hpo searches {flags}; set the search space with "
                            f"{ranges}, --min-epochs and --max-epochs")
    config = train_config(args, data_dir=args.data_dir, outer_fold=args.outer_fold)
    bounds = {param: getattr(args, f"space_{param}") for param in space.dimensions()}
    chosen = space.Space(bounds, args.min_epochs, args.max_epochs)
    trial, running = "", None

    def claimed(event) -> str:
        nonlocal trial
        trial = f"trial {event.number}"
        return f"{trial}: " + (f"resumed (trial {event.origin} was interrupted)"
                               if event.resumed else "started")

    def waiting(event) -> str | None:
        nonlocal running
        changed, running = event.running != running, event.running
        return f"waiting: {running} trial(s) on other workers" if changed else None

    lines = {
        Claimed: claimed,
        TrialReport: lambda e: (
            f"{trial}: epoch {e.epoch}/{e.epochs}, mean validation Dice {e.mean:.3f} ("
            + ", ".join(f"{d:.3f}" for d in e.fold_dice) + ")"),
        Finished: lambda e: (
            f"trial {e.number}: {e.state.lower()}"
            + ("" if e.value is None else f", mean validation Dice {e.value:.3f}")
            + f" ({e.seconds:.0f} s)"),
        Best: lambda e: f"best so far: trial {e.trial}, mean validation Dice "
                               f"{e.value:.3f}",
        Waiting: waiting,
    }
    with StopOnCtrlC() as stop:
        job = search.search(config, args.out, args.trials, chosen, args.storage, args.study,
                            args.reduction_factor, args.sampler_seed, args.heartbeat,
                            args.grace, stop=stop)
        try:
            result = drive(job, args.quiet, lines=lines)
        except KeyboardInterrupt:
            print("meshchop: interrupted; run the same command again: a trial whose worker "
                  "stopped is resumed from its checkpoints", file=sys.stderr)
            return 130
    c = result.counts
    print(f"study {result.study!r} in {result.storage}: {c.complete} complete, {c.pruned} "
          f"pruned, {c.waiting + c.running} to do, of {c.planned} trials")
    if result.stopped:
        print("meshchop: stopped; run the same command again to continue (the interrupted "
              "trial resumes from its checkpoints)", file=sys.stderr)
    if result.best is not None:
        print(f"best: trial {result.best['trial']}, mean validation Dice "
              f"{result.best['value']:.3f}: " + ", ".join(
                  f"{k}={v}" for k, v in result.best["params"].items()
                  if k in _config.searched()))
        print(f"best parameters: {result.best_path} (meshchop train --params "
              f"{result.best_path} ...)")
    print(f"dashboard: optuna-dashboard {result.storage}")
    return 0
