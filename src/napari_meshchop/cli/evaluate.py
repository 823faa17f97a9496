"""``meshchop evaluate``: score checkpoints on a part of the saved folds, a row per subject
as it finishes, through the one evaluation core."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from napari_meshchop.cli.data import add_data_dir
from napari_meshchop.cli.progress import drive
from napari_meshchop.data.folds import fold_ids
from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.network.devices import DEVICES


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="score checkpoints (several: their ensemble) on a "
                       "part of the saved folds: Dice, AVD, MCC per subject and summary")
    e.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="a checkpoint file or pretrained name; several make an ensemble "
                   "(the mean of their lesion probabilities)")
    add_data_dir(e)
    e.add_argument("--outer-fold", type=int, required=True, help="K")
    e.add_argument("--part", choices=["test", "train", "val"], default=None,
                   help="which subjects: test or train of outer fold K, or train or val of "
                   "inner fold J (default test, or val with --inner-fold)")
    e.add_argument("--inner-fold", type=int, default=None, help="J: a part of inner fold J")
    e.add_argument("--device", default="auto", choices=DEVICES)
    e.add_argument("--out", default=None,
                   help="write results.json and results.csv into this folder")
    e.add_argument("--save-predictions", action="store_true",
                   help="also write each predicted mask (network grid) to OUT/predictions")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=evaluate)


def evaluate(args) -> int:
    """Score one checkpoint (or an ensemble of several) on one part of the saved folds."""
    from napari_meshchop.evaluation import evaluate as core  # deferred: torch
    from napari_meshchop.network.inference import resolve_device

    if args.save_predictions and not args.out:
        raise MeshchopError("--save-predictions needs --out (the masks go to OUT/predictions)")
    part = args.part or ("test" if args.inner_fold is None else "val")
    ids = fold_ids(args.data_dir, args.outer_fold, part, args.inner_fold)
    if not ids:
        raise MeshchopError(f"{part} part of that fold is empty")
    device = resolve_device(args.device).type
    config = {"models": [str(m) for m in args.checkpoints],
              "data_dir": str(Path(args.data_dir).resolve()), "outer_fold": args.outer_fold,
              "inner_fold": args.inner_fold, "part": part, "device": device}
    predictions = Path(args.out) / "predictions" if args.save_predictions else None
    records: list = []

    def row(result) -> None:  # each subject's row as soon as it is scored, on stdout
        if not records:
            tqdm.write(_evaluation_row(None), file=sys.stdout)
        records.append(result)
        tqdm.write(_evaluation_row(result), file=sys.stdout)

    print(f"evaluating {len(ids)} subject{'s' * (len(ids) != 1)} ({part} of outer fold "
          f"{args.outer_fold}" + ("" if args.inner_fold is None else f", inner fold "
                                  f"{args.inner_fold}")
          + f") with {' + '.join(Path(str(m)).name for m in args.checkpoints)} on {device}")
    try:
        results = drive(core.evaluate(args.checkpoints, args.data_dir, ids, device, predictions),
                        args.quiet, lines={core.SubjectResult: row})
    except (KeyboardInterrupt, Cancelled):
        if args.out and records:
            core.write_results(args.out, records, config, complete=False)
            print(f"meshchop: interrupted; {len(records)} of {len(ids)} subjects scored, "
                  f"written to {args.out} (marked incomplete)", file=sys.stderr)
        else:
            print("meshchop: interrupted; nothing was written", file=sys.stderr)
        return 130
    print()
    print("\n".join(_evaluation_summary(results, core.summary(results))))
    if args.out:
        json_path, csv_path = core.write_results(args.out, results, config)
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


def _evaluation_summary(results, stats: dict) -> list[str]:
    failed = sum(not r.ok for r in results)
    lines = [f"{len(results) - failed} of {len(results)} subjects scored"
             + (f"; {failed} failed (see their rows)" if failed else "")]
    if failed == len(results):
        return lines
    lines.append(f"{'':<13} {'mean':>9} +/- {'SD':<9} {'median':>9} [IQR]")
    for key, name in _SHOWN:
        st = {k: _num(v, 0) if isinstance(v, float) else v for k, v in stats[key].items()}
        skipped = f"  ({st['skipped']} without a value)" if st["skipped"] else ""
        lines.append(f"{name:<13} {st['mean']:>9} +/- {st['sd']:<9} {st['median']:>9} "
                     f"[{st['q1']}, {st['q3']}]{skipped}")
    return lines
