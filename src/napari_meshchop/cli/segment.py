"""``meshchop segment``, ``fetch``, ``models`` and ``convert``: pretrained models on scans."""

from __future__ import annotations

import argparse

from napari_meshchop.cli.progress import drive
from napari_meshchop.network import registry
from napari_meshchop.network.devices import DEVICES


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("segment", help="segment the stroke lesion in a NIfTI MRI")
    s.add_argument("input", help="a 3D NIfTI image (.nii or .nii.gz)")
    s.add_argument("-o", "--output", required=True, help="where to write the lesion mask (.nii.gz)")
    s.add_argument("--model", action="append", default=None,
                   help="a checkpoint file or a pretrained name (default "
                   f"{registry.DEFAULT_MODEL}); repeat it for an ensemble of several")
    s.add_argument("--device", default="auto", choices=DEVICES)
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
