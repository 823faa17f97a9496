"""``meshchop add-correction`` and ``finetune``: corrected masks become training data, and a
checkpoint learns from them, scored before and after on held-out corrected pairs."""

from __future__ import annotations

import argparse
import sys

from napari_meshchop.cli.progress import StopOnCtrlC, drive, say
from napari_meshchop.cli.train import epoch_line, flag
from napari_meshchop.errors import MeshchopError
from napari_meshchop.training import config as _config

# The recipe's settings that fine-tuning offers as flags; the rest are the checkpoint's
# (network, grid) or the training recipe's defaults.
FLAGS = ("epochs", "lr", "crop", "lesion_crop_share", "weight_decay", "seed", "device",
         "activation_checkpointing", "memory_gb", "workers")


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("add-correction", help="put a scan and its corrected lesion mask into "
                       "a local training set (manifest and folds as for ARC); the same scan "
                       "again replaces its pair")
    a.add_argument("scan", metavar="SCAN", help="the scan (.nii or .nii.gz)")
    a.add_argument("mask", metavar="MASK", help="its corrected mask, on the scan's grid (a "
                   "sidecar MASK.json beside it is kept)")
    a.add_argument("--data-dir", required=True, help="the training set's folder (made if new)")
    a.set_defaults(func=add_correction)

    f = sub.add_parser("finetune", help="fine-tune a checkpoint on a folder of corrected "
                       "pairs (its network and grid kept); before/after on held-out pairs")
    f.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?", default=None,
                   help="the checkpoint file or pretrained name to start from (not needed "
                   "with --resume)")
    f.add_argument("--data-dir", default=None,
                   help="a folder of pairs with manifest.json (from add-correction, or an "
                   "ARC download)")
    which = f.add_mutually_exclusive_group()
    which.add_argument("--outer-fold", type=int, default=None, metavar="K",
                       help="train on outer fold K's training part, score before and after on "
                       "its test part (default 0 when the folder has folds)")
    which.add_argument("--all", action="store_true",
                       help="train on every pair (nothing held out, no before/after)")
    f.add_argument("--out", required=True, help="run folder: checkpoints, config.json, "
                   "metrics.jsonl, before_after.json and .csv")
    f.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped")
    for name in FLAGS:
        _add_setting(f, name)
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=finetune)


def _add_setting(p: argparse.ArgumentParser, name: str) -> None:
    """A flag from the setting's metadata, with fine-tuning's default where it has one."""
    _, s = _config.settings()[name]
    default = _config.FINETUNE.get(name, _config.default(name))
    kwargs = {"default": None, "help": f"{s.help} (default {default})"}
    if s.choices:
        kwargs["choices"] = s.choices
    else:
        kwargs["type"] = _config.value_type(name)
    p.add_argument(flag(name), **kwargs)


def add_correction(args) -> int:
    from napari_meshchop.data import corrections  # deferred: torch (the cache)

    added = corrections.add(args.data_dir, args.scan, args.mask)
    print("\n".join(added.summary()))
    return 0


def finetune(args) -> int:
    from napari_meshchop.training import finetune as core  # deferred: torch
    from napari_meshchop.training.loop import EpochEnd

    settings = {name: getattr(args, name) for name in FLAGS}
    if args.resume:
        config = core.resume_config(args.data_dir, **{k: settings[k] for k in FLAGS
                                                     if k in _config.names("machine")})
    else:
        if args.checkpoint is None or args.data_dir is None:
            raise MeshchopError("give the CHECKPOINT to start from and --data-dir (or "
                                "--resume a run)")
        fold = None if args.all else (args.outer_fold if args.outer_fold is not None
                                      else core.default_fold(args.data_dir))
        if fold is None and not args.all:
            say(f"meshchop: {args.data_dir} has no folds (fewer than 3 subjects): training "
                "on every pair, nothing held out for before/after")
        config = core.finetune_config(args.checkpoint, args.data_dir, fold, **settings)
    with StopOnCtrlC() as stop:
        try:
            result = drive(core.finetune(config, args.out, args.resume, stop), args.quiet,
                           lines={EpochEnd: epoch_line})
        except KeyboardInterrupt:
            print(f"meshchop: interrupted; resume with --resume --out {args.out}",
                  file=sys.stderr)
            return 130
    trained = result.training
    if trained.stopped:
        print(f"meshchop: stopped; continue with `meshchop finetune --resume --out "
              f"{args.out}`", file=sys.stderr)
    print(f"{'stopped' if trained.stopped else 'fine-tuned'} {trained.epochs_done} epochs "
          f"({trained.step} steps)")
    if result.comparison is not None:
        print(f"before and after on {len(result.held_out)} held-out pair"
              f"{'s' * (len(result.held_out) != 1)}:")
        print("\n".join(result.comparison.lines()))
    print(f"checkpoint: {result.checkpoint}")
    return 0
