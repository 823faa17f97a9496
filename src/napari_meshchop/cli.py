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
