"""``meshchop``: the command line, on the same core as the napari widgets.

One module per group of commands, each with a ``register(subparsers)``; they import only
light modules at the top, and torch and the rest inside the command that needs them, so
that ``meshchop --help`` answers at once.
"""

from __future__ import annotations

import argparse
import gc
import sys

from napari_meshchop import __version__
from napari_meshchop.cli import (
    bids,
    data,
    evaluate,
    export,
    finetune,
    segment,
    stats,
    studies,
    train,
)
from napari_meshchop.errors import Cancelled, MeshchopError

GROUPS = (segment, bids, stats, data, train, finetune, evaluate, studies, export)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshchop", description="Stroke-lesion segmentation on "
                                "MRI with MeshNet: the command line of napari-meshchop")
    p.add_argument("--version", action="version", version=f"napari-meshchop {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
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


def console() -> int:
    """The ``meshchop`` command: :func:`main`, then ``gc.freeze()`` so that the interpreter's
    shutdown leaves the objects alive at that point to the system instead of collecting
    them (about 0.5 s less for any command that imported PyTorch; docs/benchmarks.md).
    Not for use inside a process that goes on: frozen objects are never collected."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console())
