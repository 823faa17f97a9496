"""``meshchop``: the command line, on the same core as the napari widgets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Generator
from typing import Any

from tqdm import tqdm

from . import __version__, registry
from .errors import Cancelled, MeshchopError
from .events import Progress


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


def cmd_segment(args) -> int:
    from .inference import segment_file

    result = drive(segment_file(args.input, args.output, args.model, args.device), args.quiet)
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
    from . import checkpoint

    ckpt = checkpoint.load(args.source)
    ckpt.save(args.output)
    print(f"{args.output}: MeshNet channels={ckpt.arch.channels} "
          f"dilations={list(ckpt.arch.dilations)} preprocessing={ckpt.preprocess.name}")
    return 0


def cmd_download(args) -> int:
    from . import arc

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

    from . import folds

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
    from . import train
    from .preprocess import PreprocessSpec

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


def cmd_train(args) -> int:
    from . import train

    config = train_config(args, data_dir=args.data_dir, outer_fold=args.outer_fold,
                          inner_fold=None if args.full_outer else args.inner_fold,
                          full_outer=args.full_outer)
    import signal
    import threading

    stop = threading.Event()

    def on_interrupt(signum, frame):  # first Ctrl-C: stop cleanly after this step
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        tqdm.write("meshchop: stopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if main_thread else None
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
        if main_thread:
            signal.signal(signal.SIGINT, previous)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshchop", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("--version", action="version", version=f"napari-meshchop {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment the stroke lesion in a NIfTI MRI")
    s.add_argument("input", help="a 3D NIfTI image (.nii or .nii.gz)")
    s.add_argument("-o", "--output", required=True, help="where to write the lesion mask (.nii.gz)")
    s.add_argument("--model", default=registry.DEFAULT_MODEL,
                   help=f"a checkpoint file or a pretrained name (default {registry.DEFAULT_MODEL})")
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

    from . import arc, folds  # light: neither imports `datasets` or scikit-learn here

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
    t.add_argument("--outer-fold", type=int, required=True, help="K: train on its training set")
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
