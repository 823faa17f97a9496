"""``meshchop export``: a checkpoint as ONNX, or for brainchop's web app or command line."""

from __future__ import annotations

import argparse
import sys

from napari_meshchop.network.export import FORMATS

HELP = {
    "onnx": "model.onnx for onnxruntime (and `meshchop segment --model model.onnx`)",
    "tfjs": "a TF.js layers model, colour map and model-list entry for brainchop's web app",
    "brainchop": "a model folder for brainchop's command line (`brainchop --custom FOLDER`)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a model to ONNX or brainchop (web app, command line)",
        description="Write a checkpoint's network, BatchNorm folded, for another runtime, "
        "into a folder with a README and the model's provenance. "
        + "; ".join(f"{k}: {v}" for k, v in HELP.items()) + ".")
    p.add_argument("checkpoint", help="a checkpoint file or a pretrained model's name")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("-o", "--output", required=True,
                   help="the folder to write (created; its parent must exist)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from napari_meshchop.network.export.bundle import export  # defers torch

    result = export(args.checkpoint, args.format, args.output)
    for warning in result.warnings:
        print(f"meshchop: warning: {warning}", file=sys.stderr)
    print(f"{args.format} export of {args.checkpoint} written to {result.folder}: "
          f"{', '.join(p.name for p in result.files)}")
    return 0
