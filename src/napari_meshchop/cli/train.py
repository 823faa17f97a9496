"""``meshchop train``, and the recipe's flags that ``experiment`` and ``hpo`` share.

Every recipe flag is made from a :class:`~napari_meshchop.training.config.TrainConfig`
setting (its name, type, default, choices and help): a setting added there is a flag here.
"""

from __future__ import annotations

import argparse
import sys

from napari_meshchop.cli.data import add_data_dir
from napari_meshchop.cli.progress import StopOnCtrlC, drive
from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import EpochEnd
from napari_meshchop.imaging.spec import KNOWN as PREPROCESSINGS
from napari_meshchop.imaging.spec import PreprocessSpec
from napari_meshchop.training import config as _config
from napari_meshchop.training.config import TrainConfig


class _Given(argparse.Action):
    """Stores like "store" and remembers that the flag was given (so it beats --params)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """A flag for every setting that has one, then --preprocess and --shape."""
    p.add_argument("--params", default=None, help="a JSON file of training parameters "
                   "(what `meshchop hpo` writes); flags given here override it")
    for name, (_, s) in _config.settings().items():
        if not s.flag:
            continue
        default = _config.default(name)
        kwargs = {"default": default, "action": _Given, "metavar": s.metavar,
                  "help": s.help if "default" in s.help else f"{s.help} (default {_shown(default)})"}
        if s.choices:
            kwargs["choices"] = s.choices
        else:
            kwargs["type"] = _config.value_type(name)
        if isinstance(default, tuple):
            kwargs["nargs"] = len(default)
        p.add_argument(flag(name), **{k: v for k, v in kwargs.items() if v is not None})
    p.add_argument("--preprocess", default=PreprocessSpec().name, choices=PREPROCESSINGS,
                   action=_Given, help="how scans are put on the network's grid (default "
                   f"{PreprocessSpec().name})")
    p.add_argument("--shape", type=int, default=None, action=_Given,
                   help="network grid N^3 where the preprocessing allows another (default 256)")


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def train_config(args, **fixed) -> TrainConfig:
    """A TrainConfig from the recipe flags: the defaults, then ``--params FILE``, then the
    flags given on the command line; ``fixed`` fields (data, fold) last."""
    values = _config.load_params(args.params) if getattr(args, "params", None) else {}
    given = getattr(args, "given", set())
    for name, (_, s) in _config.settings().items():
        if s.flag and (name in given or name not in values):
            values[name] = getattr(args, name)
    if "preprocess" in given or "shape" in given or "preprocess" not in values:
        shape = {"shape": (args.shape,) * 3} if args.shape else {}
        try:
            values["preprocess"] = PreprocessSpec(args.preprocess, **shape).to_dict()
        except ValueError as exc:
            raise MeshchopError(str(exc)) from None
    values.update(fixed)
    return TrainConfig(**values)


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train MeshNet on a fold of a downloaded cohort "
                       "(the paper's recipe); resumable")
    add_data_dir(t)
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
    t.set_defaults(func=train)


def epoch_line(event) -> str:
    val = "" if event.val_dice is None else f", validation Dice {event.val_dice:.3f}"
    return (f"epoch {event.epoch + 1}/{event.epochs}: loss {event.train_loss:.4f}{val} "
            f"({event.seconds:.1f} s)")


def train(args) -> int:
    from napari_meshchop.training import lean  # deferred: torch
    from napari_meshchop.training.fold import train as train_fold

    lean.claim_allocator()  # this process exists to train: it may keep its heap lean
    if args.outer_fold is None and not args.resume:
        raise MeshchopError("choose an outer fold with --outer-fold K (or --resume a run)")
    config = train_config(args, data_dir=args.data_dir, outer_fold=args.outer_fold,
                          inner_fold=None if args.full_outer else args.inner_fold,
                          full_outer=args.full_outer)
    with StopOnCtrlC() as stop:
        try:
            result = drive(train_fold(config, args.out, resume=args.resume, stop=stop),
                           args.quiet, lines={EpochEnd: epoch_line})
        except KeyboardInterrupt:
            print(f"meshchop: interrupted; resume with --resume --out {args.out}",
                  file=sys.stderr)
            return 130
    if result.stopped:
        print(f"meshchop: stopped; continue with the same command and --resume --out {args.out}",
              file=sys.stderr)
    best = "" if result.best_dice is None else f"; best validation Dice {result.best_dice:.3f}"
    print(f"{'stopped' if result.stopped else 'trained'} {result.epochs_done} epochs "
          f"({result.step} steps){best}")
    print(f"checkpoint: {result.checkpoint}")
    return 0
