"""``meshchop``: the command line, on the same core as the napari widgets."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Generator
from typing import Any

from tqdm import tqdm

from napari_meshchop import __version__
from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.events import Progress
from napari_meshchop.network import registry


def drive(job: Generator[Any, None, Any], quiet: bool = False) -> Any:
    """Run a job generator with a progress bar on stderr; return its result."""
    bar = None if quiet else tqdm(total=1, unit="step", file=sys.stderr, leave=False,
                                  bar_format="{desc:<28} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
    try:
        while True:
            try:
                event = next(job)
            except StopIteration as finished:
                return finished.value
            if bar is not None and isinstance(event, Progress):
                bar.total = event.total
                bar.n = event.done
                bar.set_description_str(f"{event.stage}: {event.message}"[:28])
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()


class StopOnCtrlC(threading.Event):
    """A stop flag that the first Ctrl-C sets (the job ends cleanly after its step); a
    second Ctrl-C aborts. ``restore()`` puts the previous handler back."""

    def __init__(self):
        super().__init__()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_interrupt(self, signum, frame):
        if self.is_set():
            raise KeyboardInterrupt
        self.set()
        tqdm.write("meshchop: stopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def cmd_segment(args) -> int:
    from napari_meshchop.network.inference import segment_file

    models = args.model or [registry.DEFAULT_MODEL]
    result = drive(segment_file(args.input, args.output, models, args.device), args.quiet)
    print(f"lesion volume: {result.lesion_ml:.2f} mL ({result.lesion_voxels} voxels)")
    print(f"mask written to {args.output} (model {result.model}, device {result.device})")
    return 0


def cmd_fetch(args) -> int:
    print(registry.fetch(args.name, progress=not args.quiet))
    return 0


def cmd_models(args) -> int:
    for entry in registry.ENTRIES:
        print(f"{entry.name:<22} {entry.kind:<7} {entry.size / 1e6:5.1f} MB  {entry.description}")
    return 0


def cmd_convert(args) -> int:
    from napari_meshchop.network import checkpoint

    ckpt = checkpoint.load(args.source)
    ckpt.save(args.output)
    print(f"{args.output}: MeshNet channels={ckpt.arch.channels} "
          f"dilations={list(ckpt.arch.dilations)} preprocessing={ckpt.preprocess.name}")
    return 0


def cmd_download(args) -> int:
    from napari_meshchop.data import arc

    job = arc.download(args.data_dir, repo=args.repo, revision=args.revision,
                       folds=not args.no_folds)
    try:
        result = drive(job, args.quiet)
    except KeyboardInterrupt:
        print("meshchop: interrupted; every file on disk is complete, run the same command "
              "again to resume", file=sys.stderr)
        return 130
    print("\n".join(result.summary()))
    return 0 if result.manifest.complete else 1


def cmd_folds(args) -> int:
    from pathlib import Path

    from napari_meshchop.data import folds

    made = folds.make(args.data_dir, args.outer_folds, args.inner_folds, args.seed)
    print("\n".join(made.summary()))
    print(f"folds written to {Path(args.data_dir) / folds.NAME}")
    return 0


# TrainConfig fields set by `meshchop train` flags of the same name (dashes for underscores).
RECIPE_FLAGS = ("channels", "epochs", "lr", "weight_decay", "eps", "pct_start", "div_factor",
                "label_smoothing", "class_weights", "batch_size", "seed", "device", "amp",
                "activation_checkpointing", "memory_gb", "crop", "lesion_crop_share", "workers")


def train_config(args, **fixed):
    """A TrainConfig from the recipe flags: the defaults, then ``--params FILE``, then the
    flags given on the command line; ``fixed`` fields (data, fold) last."""
    from napari_meshchop.imaging.preprocess import PreprocessSpec
    from napari_meshchop.training import loop as train

    values = train.load_params(args.params) if getattr(args, "params", None) else {}
    given = getattr(args, "given", set())
    for name in RECIPE_FLAGS:
        if name in given or name not in values:
            values[name] = getattr(args, name)
    if "preprocess" in given or "shape" in given or "preprocess" not in values:
        shape = {"shape": (args.shape,) * 3} if args.shape else {}
        values["preprocess"] = PreprocessSpec(args.preprocess, **shape).to_dict()
    values.update(fixed)
    return train.TrainConfig(**values)


class _Given(argparse.Action):
    """Stores like "store" and remembers that the flag was given (so it beats --params)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def add_recipe_flags(t: argparse.ArgumentParser) -> None:
    """The training recipe's flags, shared by `train`, `experiment` and `hpo`."""
    t.add_argument("--params", default=None, help="a JSON file of training parameters "
                   "(what `meshchop hpo` writes); flags given here override it")
    t.add_argument("--channels", type=int, default=26, action=_Given,
                   help="MeshNet width (5, 16, 26 or any)")
    t.add_argument("--epochs", type=int, default=50, action=_Given)
    t.add_argument("--lr", type=float, default=1e-3, action=_Given,
                   help="AdamW and OneCycle max learning rate")
    t.add_argument("--weight-decay", type=float, default=3e-5, action=_Given)
    t.add_argument("--eps", type=float, default=1e-4, action=_Given, help="AdamW epsilon")
    t.add_argument("--pct-start", type=float, default=0.01, action=_Given)
    t.add_argument("--div-factor", type=float, default=100.0, action=_Given)
    t.add_argument("--label-smoothing", type=float, default=0.01, action=_Given)
    t.add_argument("--class-weights", type=float, nargs=2, default=(0.5, 1.0), action=_Given,
                   metavar=("BACKGROUND", "LESION"))
    t.add_argument("--batch-size", type=int, default=1, action=_Given)
    t.add_argument("--seed", type=int, default=42, action=_Given)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   action=_Given)
    t.add_argument("--amp", default="auto", choices=["auto", "on", "off"], action=_Given,
                   help="fp16 autocast (auto: on CUDA only)")
    t.add_argument("--activation-checkpointing", default="auto", choices=["auto", "on", "off"],
                   action=_Given, help="recompute activations to save memory (auto: when "
                   "needed)")
    t.add_argument("--memory-gb", type=float, default=None, action=_Given,
                   help="memory to plan for (default: what the device has free)")
    t.add_argument("--crop", type=int, default=None, action=_Given,
                   help="train on random crops of N^3")
    t.add_argument("--lesion-crop-share", type=float, default=0.5, action=_Given)
    t.add_argument("--workers", type=int, default=0, action=_Given, help="data loader workers")
    t.add_argument("--preprocess", default="conform", choices=["conform", "ras-minmax"],
                   action=_Given)
    t.add_argument("--shape", type=int, default=None, action=_Given,
                   help="network grid N^3 for ras-minmax (default 256)")


def add_heartbeat_flags(p: argparse.ArgumentParser, unit: str, prefix: str = "") -> None:
    """How a shared study tells a dead worker (engine.py), for `experiment` and `hpo`."""
    from napari_meshchop.studies.engine import GRACE_BEATS, HEARTBEAT

    p.add_argument("--heartbeat", type=int, default=HEARTBEAT, help=f"{prefix}seconds "
                   f"between a worker's heartbeats (default {HEARTBEAT})")
    p.add_argument("--grace", type=int, default=None, help=f"{prefix}seconds without a "
                   f"heartbeat after which a worker's {unit} is retried (default "
                   f"{GRACE_BEATS} heartbeats)")


def cmd_train(args) -> int:
    from napari_meshchop.training import loop as train

    if args.outer_fold is None and not args.resume:
        raise MeshchopError("choose an outer fold with --outer-fold K (or --resume a run)")
    config = train_config(args, data_dir=args.data_dir, outer_fold=args.outer_fold,
                          inner_fold=None if args.full_outer else args.inner_fold,
                          full_outer=args.full_outer)
    stop = StopOnCtrlC()

    job = train.train(config, args.out, resume=args.resume, stop=stop)
    bar = None if args.quiet else tqdm(total=1, unit="step", file=sys.stderr, leave=False,
                                       dynamic_ncols=True)
    try:
        while True:
            try:
                event = next(job)
            except StopIteration as finished:
                result = finished.value
                break
            if isinstance(event, train.Step) and bar is not None:
                bar.total, bar.n = event.total, event.done
                bar.set_description_str(event.message)
                bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
                bar.refresh()
            elif isinstance(event, train.EpochEnd):
                val = "" if event.val_dice is None else f", validation Dice {event.val_dice:.3f}"
                tqdm.write(f"epoch {event.epoch + 1}/{event.epochs}: loss "
                           f"{event.train_loss:.4f}{val} ({event.seconds:.1f} s)", file=sys.stderr)
            elif isinstance(event, train.Notice):
                tqdm.write(f"meshchop: {event.message}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"meshchop: interrupted; resume with --resume --out {args.out}", file=sys.stderr)
        return 130
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    if result.stopped:
        print(f"meshchop: stopped; continue with the same command and --resume --out {args.out}",
              file=sys.stderr)
    best = "" if result.best_dice is None else f"; best validation Dice {result.best_dice:.3f}"
    print(f"{'stopped' if result.stopped else 'trained'} {result.epochs_done} epochs "
          f"({result.step} steps){best}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def cmd_evaluate(args) -> int:
    """Score one checkpoint (or an ensemble of several) on one part of the saved folds."""
    from pathlib import Path

    from napari_meshchop.evaluation import evaluate
    from napari_meshchop.network.inference import resolve_device

    if args.save_predictions and not args.out:
        raise MeshchopError("--save-predictions needs --out (the masks go to OUT/predictions)")
    part = args.part or ("test" if args.inner_fold is None else "val")
    ids = evaluate.fold_ids(args.data_dir, args.outer_fold, part, args.inner_fold)
    if not ids:
        raise MeshchopError(f"{part} part of that fold is empty")
    device = resolve_device(args.device).type
    config = {"models": [str(m) for m in args.checkpoints],
              "data_dir": str(Path(args.data_dir).resolve()), "outer_fold": args.outer_fold,
              "inner_fold": args.inner_fold, "part": part, "device": device}
    predictions = Path(args.out) / "predictions" if args.save_predictions else None
    records: list = []

    def printing(job):  # each subject's row as soon as it is scored; progress to the bar
        while True:
            try:
                event = next(job)
            except StopIteration as finished:
                return finished.value
            if isinstance(event, evaluate.SubjectResult):
                records.append(event)
                tqdm.write(_evaluation_row(event), file=sys.stdout)
                continue
            if event.stage == "evaluate" and event.done == 0:  # the model loaded fine
                tqdm.write(_evaluation_row(None), file=sys.stdout)
            yield event

    print(f"evaluating {len(ids)} subject{'s' * (len(ids) != 1)} ({part} of outer fold "
          f"{args.outer_fold}" + ("" if args.inner_fold is None else f", inner fold "
                                  f"{args.inner_fold}")
          + f") with {' + '.join(Path(str(m)).name for m in args.checkpoints)} on {device}")
    try:
        results = drive(printing(evaluate.evaluate(args.checkpoints, args.data_dir, ids, device,
                                                   predictions)), args.quiet)
    except (KeyboardInterrupt, Cancelled):
        if args.out and records:
            evaluate.write_results(args.out, records, config, complete=False)
            print(f"meshchop: interrupted; {len(records)} of {len(ids)} subjects scored, "
                  f"written to {args.out} (marked incomplete)", file=sys.stderr)
        else:
            print("meshchop: interrupted; nothing was written", file=sys.stderr)
        return 130
    print()
    print("\n".join(_evaluation_summary(results)))
    if args.out:
        json_path, csv_path = evaluate.write_results(args.out, results, config)
        print(f"results written to {json_path} and {csv_path}")
    return 0


_SHOWN = (("dice", "lesion Dice"), ("macro_dice", "macro Dice"), ("avd", "AVD"),
          ("mcc", "MCC"), ("precision", "precision"), ("recall", "recall"),
          ("true_ml", "true mL"), ("pred_ml", "predicted mL"))


def _evaluation_row(r) -> str:
    """One subject's line of `meshchop evaluate` (the header when ``r`` is None)."""
    if r is None:
        return (f"{'subject':<22} {'acquisition':<15} {'true mL':>8} {'pred mL':>8} "
                f"{'Dice':>6} {'macro':>6} {'AVD':>6} {'MCC':>6}")
    head = f"{r.subject:<22} {r.acquisition:<15}"
    if not r.ok:
        return f"{head} error: {r.error}"
    s = r.scores
    return (f"{head} {s['true_ml']:8.2f} {s['pred_ml']:8.2f} {s['dice']:6.3f} "
            f"{s['macro_dice']:6.3f} {_num(s['avd'], 6)} {s['mcc']:6.3f}")


def _num(value: float, width: int) -> str:
    return f"{'n/a':>{width}}" if value != value else f"{value:{width}.3f}"  # NaN: n/a


def _evaluation_summary(results) -> list[str]:
    from napari_meshchop.evaluation.evaluate import summary

    failed = sum(not r.ok for r in results)
    lines = [f"{len(results) - failed} of {len(results)} subjects scored"
             + (f"; {failed} failed (see their rows)" if failed else "")]
    if failed == len(results):
        return lines
    lines.append(f"{'':<13} {'mean':>9} +/- {'SD':<9} {'median':>9} [IQR]")
    stats = summary(results)
    for key, name in _SHOWN:
        st = {k: _num(v, 0) if isinstance(v, float) else v for k, v in stats[key].items()}
        skipped = f"  ({st['skipped']} without a value)" if st["skipped"] else ""
        lines.append(f"{name:<13} {st['mean']:>9} +/- {st['sd']:<9} {st['median']:>9} "
                     f"[{st['q1']}, {st['q3']}]{skipped}")
    return lines


def cmd_experiment(args) -> int:
    """Run (or continue) the paper's protocol and write its report; or only the report."""
    from pathlib import Path

    from napari_meshchop.evaluation import report
    from napari_meshchop.studies import experiment
    from napari_meshchop.training import loop as train

    out = Path(args.out)
    if args.report_only:  # ensembles (evaluation only) and the report; no training
        doc = drive(experiment.finish(out, experiment.load_plan(out), args.ensemble,
                                      args.compare, args.device), args.quiet)
        print(report.markdown(doc), end="")
        print(f"\nreport written to {out / report.REPORT_MD} and {out / report.REPORT_JSON}")
        return 0

    def asked_plan():  # with no recipe flags, the plan saved in --out (to continue it)
        from dataclasses import replace

        from napari_meshchop.data import arc
        from napari_meshchop.data import folds as _folds

        given = getattr(args, "given", set()) - set(experiment.HOW)
        asked = (given or args.params or args.restarts is not None or args.folds is not None
                 or args.data_dir is not None)
        data_dir = args.data_dir or str(arc.DEFAULT_DATA_DIR)
        config = train_config(args, data_dir=data_dir)
        if (out / experiment.PLAN).is_file() and not asked:
            saved = experiment.load_plan(out)
            how = {k: getattr(config, k) for k in experiment.HOW}
            return replace(saved, config=replace(saved.config, **how))
        fold_list = args.folds
        if fold_list is None:
            fold_list = range(_folds.load(data_dir).outer_folds)
        return experiment.plan(config, fold_list, 10 if args.restarts is None else args.restarts)

    plan = asked_plan()
    stop = StopOnCtrlC()

    if args.storage:  # runs shared with other workers through a study (engine.py)
        from napari_meshchop.studies import engine

        job = engine.shared_experiment(out, plan, args.storage, args.study,
                                       ensemble=args.ensemble, compare=args.compare,
                                       heartbeat=args.heartbeat, grace=args.grace, stop=stop)
    else:
        job = experiment.experiment(out, plan, ensemble=args.ensemble, compare=args.compare,
                                    stop=stop)
    bars = [] if args.quiet else [
        tqdm(total=len(plan.runs), unit="run", file=sys.stderr, leave=False, position=0,
             dynamic_ncols=True),
        tqdm(total=1, unit="step", file=sys.stderr, leave=False, position=1,
             dynamic_ncols=True)]
    resume = f"meshchop experiment --out {args.out}" + (
        f" --storage {_redact(args.storage)} --study {args.study}" if args.storage else "")
    try:
        while True:
            try:
                event = next(job)
            except StopIteration as finished:
                doc = finished.value
                break
            if isinstance(event, train.Notice):
                tqdm.write(f"meshchop: {event.message}", file=sys.stderr)
            elif bars and isinstance(event, experiment.RunProgress):
                bars[0].total, bars[0].n = event.total, event.done
                bars[0].set_description_str(f"runs ({event.key})")
                bars[0].refresh()
                bars[1].reset(total=1)  # a new run: its own steps and rate
            elif bars and isinstance(event, Progress):
                bars[1].total, bars[1].n = event.total, event.done
                bars[1].set_description_str(f"{event.stage}: {event.message}"[:32])
                bars[1].set_postfix_str(f"loss={event.loss:.4f}" if isinstance(
                    event, train.Step) else "", refresh=False)
                bars[1].refresh()
    except (Cancelled, KeyboardInterrupt):
        print(f"meshchop: stopped; complete runs are kept and an interrupted one resumes "
              f"from its checkpoint: run `{resume}` to continue", file=sys.stderr)
        return 130
    finally:
        stop.restore()
        for bar in reversed(bars):
            bar.close()
    print(report.markdown(doc), end="")
    print(f"\nreport written to {out / report.REPORT_MD} and {out / report.REPORT_JSON}")
    return 0


def _redact(storage: str) -> str:
    from napari_meshchop.studies.engine import redact

    return redact(storage)


def cmd_hpo(args) -> int:
    """Search hyperparameters with ASHA on the inner folds of an outer fold, or join a
    search that workers on this or other machines share (same --storage and --study)."""
    from napari_meshchop.studies import engine, hpo
    from napari_meshchop.training import loop as train

    searched = sorted(getattr(args, "given", set()) & set(hpo.SEARCHED))
    if searched:
        flags = ", ".join("--" + name.replace("_", "-") for name in searched)
        raise MeshchopError(f"meshchop hpo searches {flags}; set the search space with "
                            "--channels-range, --lr-range, --weight-decay-range, "
                            "--background-weight-range, --pct-start-choices, --min-epochs "
                            "and --max-epochs")
    config = train_config(args, data_dir=args.data_dir, outer_fold=args.outer_fold)
    space = hpo.Space(channels=args.channels_range, lr=args.lr_range,
                      weight_decay=args.weight_decay_range,
                      background_weight=args.background_weight_range,
                      pct_start=args.pct_start_choices, min_epochs=args.min_epochs,
                      max_epochs=args.max_epochs)
    stop = StopOnCtrlC()

    job = hpo.search(config, args.out, args.trials, space, args.storage, args.study,
                     args.reduction_factor, args.sampler_seed, args.heartbeat, args.grace,
                     stop=stop)
    bar = None if args.quiet else tqdm(total=1, unit="step", file=sys.stderr, leave=False,
                                       dynamic_ncols=True)
    say = (lambda text: None) if args.quiet else (lambda text: tqdm.write(text, file=sys.stderr))
    trial = ""
    try:
        while True:
            try:
                event = next(job)
            except StopIteration as finished:
                result = finished.value
                break
            if isinstance(event, engine.Claimed):
                trial = f"trial {event.number}"
                say(f"{trial}: " + (f"resumed (trial {event.origin} was interrupted)"
                                    if event.resumed else "started"))
            elif isinstance(event, hpo.TrialReport):
                say(f"{trial}: epoch {event.epoch}/{event.epochs}, mean validation Dice "
                    f"{event.mean:.3f} (" + ", ".join(f"{d:.3f}" for d in event.fold_dice)
                    + ")")
            elif isinstance(event, engine.Finished):
                value = "" if event.value is None else f", mean validation Dice {event.value:.3f}"
                say(f"trial {event.number}: {event.state.lower()}{value} "
                    f"({event.seconds:.0f} s)")
            elif isinstance(event, hpo.Best):
                say(f"best so far: trial {event.trial}, mean validation Dice {event.value:.3f}")
            elif isinstance(event, engine.Waiting) and bar is not None:
                bar.set_description_str(f"waiting: {event.running} trial(s) on other workers")
                bar.refresh()
            elif isinstance(event, train.Notice):
                say(f"meshchop: {event.message}")
            elif isinstance(event, train.Step) and bar is not None:
                bar.total, bar.n = event.total, event.done
                bar.set_description_str(f"{trial}: {event.message}")
                bar.refresh()
    except KeyboardInterrupt:
        print("meshchop: interrupted; run the same command again: a trial whose worker "
              "stopped is resumed from its checkpoints", file=sys.stderr)
        return 130
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    c = result.counts
    print(f"study {result.study!r} in {result.storage}: {c.complete} complete, {c.pruned} "
          f"pruned, {c.waiting + c.running} to do, of {c.planned} trials")
    if result.stopped:
        print("meshchop: stopped; run the same command again to continue (the interrupted "
              "trial resumes from its checkpoints)", file=sys.stderr)
    if result.best is not None:
        print(f"best: trial {result.best['trial']}, mean validation Dice "
              f"{result.best['value']:.3f}: " + ", ".join(
                  f"{k}={v}" for k, v in result.best["params"].items() if k in hpo.SEARCHED))
        print(f"best parameters: {result.best_path} (meshchop train --params "
              f"{result.best_path} ...)")
    print(f"dashboard: optuna-dashboard {result.storage}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshchop", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("--version", action="version", version=f"napari-meshchop {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment the stroke lesion in a NIfTI MRI")
    s.add_argument("input", help="a 3D NIfTI image (.nii or .nii.gz)")
    s.add_argument("-o", "--output", required=True, help="where to write the lesion mask (.nii.gz)")
    s.add_argument("--model", action="append", default=None,
                   help="a checkpoint file or a pretrained name (default "
                   f"{registry.DEFAULT_MODEL}); repeat it for an ensemble of several")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_segment)

    f = sub.add_parser("fetch", help="download (or find in MESHCHOP_MIRROR) a model or sample; "
                       "print its path")
    f.add_argument("name", choices=registry.names())
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=cmd_fetch)

    m = sub.add_parser("models", help="list pretrained models and sample data")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("convert", help="rewrite a checkpoint (arc-meshchop's too) in our format")
    c.add_argument("source")
    c.add_argument("output")
    c.set_defaults(func=cmd_convert)

    from napari_meshchop.data import (
        arc,  # light: neither imports `datasets` or scikit-learn here
        folds,
    )

    d = sub.add_parser("download", help="fetch the paper's ARC cohort (T2w + lesion masks, "
                       "about 25 GB) from the Hugging Face hub; resumes; writes folds")
    d.add_argument("--repo", default=arc.REPO,
                   help=f"hub dataset id, or a local copy laid out like it (default {arc.REPO})")
    d.add_argument("--revision", default=None, help="hub branch, tag or commit (default main)")
    d.add_argument("--data-dir", default=str(arc.DEFAULT_DATA_DIR),
                   help=f"where to write the pairs and manifest.json (default "
                   f"{arc.DEFAULT_DATA_DIR})")
    d.add_argument("--no-folds", action="store_true", help="do not write folds.json")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_download)

    k = sub.add_parser("folds", help="(re)make the nested cross-validation folds of a "
                       "downloaded cohort")
    k.add_argument("--data-dir", default=str(arc.DEFAULT_DATA_DIR),
                   help=f"the folder with manifest.json (default {arc.DEFAULT_DATA_DIR})")
    k.add_argument("--seed", type=int, default=folds.SEED, help=f"default {folds.SEED}")
    k.add_argument("--outer-folds", type=int, default=folds.OUTER_FOLDS,
                   help=f"default {folds.OUTER_FOLDS}")
    k.add_argument("--inner-folds", type=int, default=folds.INNER_FOLDS,
                   help=f"default {folds.INNER_FOLDS}")
    k.set_defaults(func=cmd_folds)

    t = sub.add_parser("train", help="train MeshNet on a fold of a downloaded cohort "
                       "(the paper's recipe); resumable")
    t.add_argument("--data-dir", default=str(arc.DEFAULT_DATA_DIR),
                   help=f"the folder with manifest.json and folds.json (default "
                   f"{arc.DEFAULT_DATA_DIR})")
    t.add_argument("--outer-fold", type=int, default=None,
                   help="K: train on its training set (with --resume: the run's own)")
    which = t.add_mutually_exclusive_group()
    which.add_argument("--inner-fold", type=int, default=0,
                       help="J: train on inner fold J, validate on its val part (default 0)")
    which.add_argument("--full-outer", action="store_true",
                       help="train on the whole outer training set, without validation")
    t.add_argument("--out", required=True, help="run folder: checkpoints, config.json, "
                   "metrics.jsonl")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped")
    add_recipe_flags(t)
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help="score checkpoints (several: their ensemble) on a "
                       "part of the saved folds: Dice, AVD, MCC per subject and summary")
    e.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="a checkpoint file or pretrained name; several make an ensemble "
                   "(the mean of their lesion probabilities)")
    e.add_argument("--data-dir", default=str(arc.DEFAULT_DATA_DIR),
                   help=f"the folder with manifest.json and folds.json (default "
                   f"{arc.DEFAULT_DATA_DIR})")
    e.add_argument("--outer-fold", type=int, required=True, help="K")
    e.add_argument("--part", choices=["test", "train", "val"], default=None,
                   help="which subjects: test or train of outer fold K, or train or val of "
                   "inner fold J (default test, or val with --inner-fold)")
    e.add_argument("--inner-fold", type=int, default=None, help="J: a part of inner fold J")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    e.add_argument("--out", default=None,
                   help="write results.json and results.csv into this folder")
    e.add_argument("--save-predictions", action="store_true",
                   help="also write each predicted mask (network grid) to OUT/predictions")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)
    x = sub.add_parser("experiment", help="the paper's protocol: outer folds x restarts, each "
                       "trained on the whole outer training set and tested on the outer test "
                       "set; a report beside the paper's Table 1; resumable")
    x.add_argument("--out", required=True, help="experiment folder: plan.json, "
                   "fold{K}/restart{R}/ (run folders with results.json), report.md, "
                   "report.json; run again to continue")
    x.add_argument("--data-dir", default=None, help=f"the folder with manifest.json and "
                   f"folds.json (default: the experiment's, else {arc.DEFAULT_DATA_DIR})")
    x.add_argument("--restarts", type=int, default=None,
                   help="runs per fold, seeds SEED..SEED+N-1 (default 10)")
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
    x.set_defaults(func=cmd_experiment)
    h = sub.add_parser("hpo", help="search hyperparameters with asynchronous successive "
                       "halving (ASHA) on the inner folds of an outer fold; workers on many "
                       "machines share one study")
    h.add_argument("--data-dir", default=str(arc.DEFAULT_DATA_DIR),
                   help=f"the folder with manifest.json and folds.json (default "
                   f"{arc.DEFAULT_DATA_DIR})")
    h.add_argument("--outer-fold", type=int, default=0,
                   help="K: search on its inner folds (default 0)")
    h.add_argument("--trials", type=int, default=50,
                   help="trials in the study (set by its first worker; default 50)")
    h.add_argument("--out", required=True, help="folder: best_params.json, trials/NNN/ (the "
                   "trials' runs; share it between machines to resume a dead worker's trial), "
                   "study.journal (the default storage)")
    h.add_argument("--storage", default=None, help="where the study lives: a journal file "
                   "(default OUT/study.journal) or a database URL shared by several machines, "
                   "e.g. postgresql://user:password@host/db")
    h.add_argument("--study", default="meshchop-hpo", help="study name (default meshchop-hpo)")
    h.add_argument("--min-epochs", type=int, default=15,
                   help="ASHA's minimum resource: the first rung (default 15)")
    h.add_argument("--max-epochs", type=int, default=50,
                   help="epochs of a full trial and of its OneCycle schedule (default 50)")
    h.add_argument("--reduction-factor", type=int, default=3,
                   help="ASHA keeps the top 1/N at each rung (default 3)")
    h.add_argument("--channels-range", type=int, nargs=2, default=(5, 21),
                   metavar=("LOW", "HIGH"), help="MeshNet width, integer (default 5 21)")
    h.add_argument("--lr-range", type=float, nargs=2, default=(1e-4, 4e-2),
                   metavar=("LOW", "HIGH"), help="learning rate, log-uniform (default 1e-4 4e-2)")
    h.add_argument("--weight-decay-range", type=float, nargs=2, default=(1e-4, 4e-2),
                   metavar=("LOW", "HIGH"), help="log-uniform (default 1e-4 4e-2)")
    h.add_argument("--background-weight-range", type=float, nargs=2, default=(0.0, 1.0),
                   metavar=("LOW", "HIGH"),
                   help="background class weight, uniform; the lesion's is 1 (default 0 1)")
    h.add_argument("--pct-start-choices", type=float, nargs="+", default=(0.02, 0.1, 0.2),
                   metavar="SHARE", help="OneCycle warm-up shares (default 0.02 0.1 0.2)")
    h.add_argument("--sampler-seed", type=int, default=42,
                   help="TPE's seed, used by the study's first worker (default 42)")
    add_heartbeat_flags(h, "trial")
    add_recipe_flags(h)
    h.add_argument("-q", "--quiet", action="store_true", help="no progress")
    h.set_defaults(func=cmd_hpo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Cancelled:
        print("meshchop: stopped", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("meshchop: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MeshchopError as exc:
        print(f"meshchop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
