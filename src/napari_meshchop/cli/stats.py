"""``meshchop stats``: a lesion mask's volume and connected components, from the core
(:func:`napari_meshchop.evaluation.lesions.lesion_stats`) that the napari panel uses."""

from __future__ import annotations

import argparse

import numpy as np

from napari_meshchop.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("stats", help="a lesion mask's volume (mL) and its 26-connected "
                       "components: volume, centroid (RAS mm), side of the midline")
    s.add_argument("mask", metavar="MASK", help="a lesion mask (.nii or .nii.gz); voxels "
                   "above 0 are lesion")
    s.add_argument("--scan", default=None, help="the scan the mask was drawn on: the head's "
                   "centre of mass places the midline (default: the grid's centre)")
    s.add_argument("--csv", default=None, metavar="OUT", help="also write one row per "
                   "component to this CSV file")
    s.set_defaults(func=stats)


def stats(args) -> int:
    from napari_meshchop.evaluation.lesions import lesion_stats  # deferred: scipy
    from napari_meshchop.imaging.nifti import load_mask  # deferred: nibabel

    loaded = load_mask(args.mask)
    mask, affine = np.asanyarray(loaded.dataobj), loaded.affine
    image = None
    if args.scan:
        scan = load_mask(args.scan)  # any 3D volume reads the same way
        image, scan_affine = np.asanyarray(scan.dataobj), scan.affine
        if image.shape != mask.shape or not np.allclose(scan_affine, affine, atol=1e-3):
            raise InputError(args.scan, f"not on the grid of {args.mask} (shape "
                             f"{image.shape} vs {mask.shape}, or another affine)")
    result = lesion_stats(mask, affine, image)
    print(f"{args.mask}: {result.summary()}")
    print(f"midline: RAS x = {result.midline_x:.1f} mm ({result.midline_from}); "
          "left is RAS x below it")
    if result.components:
        print(f"{'#':>3} {'voxels':>8} {'mL':>9} {'share':>6}  {'x mm':>7} {'y mm':>7} "
              f"{'z mm':>7}  side")
        for c in result.components:
            x, y, z = c.centroid_mm
            print(f"{c.number:>3} {c.voxels:>8} {c.volume_ml:>9.3f} {100 * c.share:>5.1f}%  "
                  f"{x:>7.1f} {y:>7.1f} {z:>7.1f}  {c.side}")
    if args.csv:
        print(f"components written to {result.write_csv(args.csv)}")
    return 0
