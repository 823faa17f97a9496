"""``meshchop segment``, ``fetch``, ``models`` and ``convert``: pretrained models on scans."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_meshchop.cli.bids import add_segment_flags, cmd_segment_many
from napari_meshchop.cli.progress import drive
from napari_meshchop.errors import MeshchopError
from napari_meshchop.network import registry


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("segment", help="segment the stroke lesion in a NIfTI MRI, or in "
                       "several (files or folders, with -o OUTDIR)")
    s.add_argument("input", nargs="+", help="a 3D NIfTI image (.nii or .nii.gz); several, or "
                   "folders of them, are a cohort written into the folder -o names")
    s.add_argument("-o", "--output", required=True, help="where to write the lesion mask "
                   "(.nii.gz); for a cohort, the folder of masks, lesions.tsv and report.html")
    add_segment_flags(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=segment)

    f = sub.add_parser("fetch", help="download (or find in MESHCHOP_MIRROR) a model or sample; "
                       "print its path")
    f.add_argument("name", choices=registry.names())
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=fetch)

    m = sub.add_parser("models", help="list pretrained models and sample data")
    m.set_defaults(func=models)

    c = sub.add_parser("convert", help="rewrite a checkpoint (arc-meshchop's too) in our format")
    c.add_argument("source")
    c.add_argument("output")
    c.set_defaults(func=convert)


def segment(args) -> int:
    """One scan into one mask file; several scans, or folders, into a folder."""
    # A name with a suffix is a mask file (checked to be NIfTI further on); else a folder.
    to_file = Path(args.output).suffix != "" and not Path(args.output).is_dir()
    folder = next((p for p in args.input if Path(p).is_dir()), None)
    if to_file and folder is not None:
        raise MeshchopError(f"{folder}: is a folder; to segment the images in it, give -o "
                            "a folder for their masks")
    if len(args.input) > 1 or not to_file:
        return cmd_segment_many(args)
    if args.threshold != 0.5 or args.save_probability:
        raise MeshchopError("--threshold and --save-probability are for a cohort: give "
                            "-o a folder")
    args.input = args.input[0]
    from napari_meshchop.network.inference import segment_file  # deferred: torch

    models_ = args.model or [registry.DEFAULT_MODEL]
    result = drive(segment_file(args.input, args.output, models_, args.device), args.quiet)
    print(f"lesion volume: {result.lesion_ml:.2f} mL ({result.lesion_voxels} voxels)")
    print(f"mask written to {args.output} (model {result.model}, device {result.device})")
    return 0


def fetch(args) -> int:
    print(registry.fetch(args.name, progress=not args.quiet))
    return 0


def models(args) -> int:
    for entry in registry.ENTRIES:
        print(f"{entry.name:<22} {entry.kind:<7} {entry.size / 1e6:5.1f} MB  {entry.description}")
    return 0


def convert(args) -> int:
    from napari_meshchop.network import checkpoint  # deferred: torch

    ckpt = checkpoint.load(args.source)
    ckpt.save(args.output)
    print(f"{args.output}: MeshNet channels={ckpt.arch.channels} "
          f"dilations={list(ckpt.arch.dilations)} preprocessing={ckpt.preprocess.name}")
    return 0
