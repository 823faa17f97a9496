"""``meshchop download`` and ``folds``: the ARC training cohort and its cross-validation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_meshchop.cli.progress import drive
from napari_meshchop.data import DEFAULT_DATA_DIR, REPO, folds

DATA_DIR = str(DEFAULT_DATA_DIR)


def add_data_dir(p: argparse.ArgumentParser, holds: str = "manifest.json and folds.json",
                 default: str | None = DATA_DIR) -> None:
    """The cohort folder flag, shared by every command that reads a cohort (``default``
    None: the experiment's own, else DATA_DIR)."""
    shown = default or f"the experiment's, else {DATA_DIR}"
    p.add_argument("--data-dir", default=default,
                   help=f"the folder with {holds} (default {shown})")


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("download", help="fetch the paper's ARC cohort (T2w + lesion masks, "
                       "about 25 GB) from the Hugging Face hub; resumes; writes folds")
    d.add_argument("--repo", default=REPO,
                   help=f"hub dataset id, or a local copy laid out like it (default {REPO})")
    d.add_argument("--revision", default=None, help="hub branch, tag or commit (default main)")
    add_data_dir(d, "the pairs and manifest.json to write")
    d.add_argument("--no-folds", action="store_true", help="do not write folds.json")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=download)

    k = sub.add_parser("folds", help="(re)make the nested cross-validation folds of a "
                       "downloaded cohort")
    add_data_dir(k, "manifest.json")
    k.add_argument("--seed", type=int, default=folds.SEED, help=f"default {folds.SEED}")
    k.add_argument("--outer-folds", type=int, default=folds.OUTER_FOLDS,
                   help=f"default {folds.OUTER_FOLDS}")
    k.add_argument("--inner-folds", type=int, default=folds.INNER_FOLDS,
                   help=f"default {folds.INNER_FOLDS}")
    k.set_defaults(func=make_folds)


def download(args) -> int:
    from napari_meshchop.data import arc  # deferred: nibabel

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


def make_folds(args) -> int:
    made = folds.make(args.data_dir, args.outer_folds, args.inner_folds, args.seed)
    print("\n".join(made.summary()))
    print(f"folds written to {Path(args.data_dir) / folds.NAME}")
    return 0
