"""A small BIDS dataset made from the real sample scan, and models for it.

The ARC sample scan (256^3, 1 mm) is averaged down to ``voxel`` mm blocks, with the affine
that puts each block's voxel at the centre of the voxels it averages. The dataset holds:

- sub-01, two sessions: ``ses-1`` the scan; ``ses-2`` the same brain 12 mm further right
  in the scanner, stored as int16 with twice the intensity;
- sub-02, no sessions: ``run-1`` the scan; ``run-2`` a reoriented copy (its voxels stored
  in PSR order, the affine changed to match: the same image in the world);
- ``sub-02_acq-broken_T2w.nii.gz``: the first half of a valid file (truncated).

:func:`coarse_model` writes the pretrained MeshNet-26's weights with a coarser network grid
(``ras-minmax`` at ``voxel`` mm), so that a demo segments a scan in seconds, not minutes.

Run ``python tests/bids_example.py FOLDER [--voxel-size 2] [--model MODEL.pt]`` to write
them (the docs do; ``MESHCHOP_MIRROR`` must hold the sample scan and the model).
:func:`bright_model` makes a MeshNet whose answer is known, for tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.network import checkpoint, registry
from napari_meshchop.network.model import Architecture, MeshNet

GOOD = ("sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2_T2w.nii.gz",
        "sub-02/anat/sub-02_run-1_T2w.nii.gz", "sub-02/anat/sub-02_run-2_T2w.nii.gz")
BROKEN = "sub-02/anat/sub-02_acq-broken_T2w.nii.gz"
SHARPNESS = 50.0  # of bright_model's sigmoid


def downsample(img: nib.Nifti1Image, factor: int) -> nib.Nifti1Image:
    """Mean of ``factor``^3 blocks; block voxel (0, 0, 0) sits at the centre of the old
    voxels 0 .. factor - 1 on each axis."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    n = [s // factor for s in data.shape[:3]]
    data = data[: n[0] * factor, : n[1] * factor, : n[2] * factor]
    blocks = data.reshape(n[0], factor, n[1], factor, n[2], factor).mean(axis=(1, 3, 5))
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2
    return nib.Nifti1Image(blocks.astype(np.float32), img.affine @ scale)


def _save(img: nib.Nifti1Image, path: Path, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = nib.Nifti1Image(np.asarray(img.dataobj).round().astype(dtype), img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    nib.save(out, path)
    return path


def scan(voxel: int = 4, source: str | Path | None = None) -> nib.Nifti1Image:
    if source is None:
        source = registry.fetch(registry.SAMPLE_SCAN)
    return downsample(nib.load(source), voxel)


def build(root: str | Path, voxel: int = 4, source: str | Path | None = None) -> Path:
    """Write the dataset under ``root``; return ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = scan(voxel, source)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "meshchop example", "BIDSVersion": "1.10.0", "DatasetType": "raw",
         "License": "CC0", "DatasetDOI": "doi:10.18112/openneuro.ds004884.v1.0.1"}, indent=1))
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    (root / "README").write_text("The ARC sample scan (sub-M2265, CC0), averaged to "
                                 f"{voxel} mm, in a few copies.\n")
    _save(base, root / GOOD[0])
    moved = base.affine.copy()
    moved[0, 3] += 12.0  # 12 mm towards the scanner's x+ (right)
    twice = np.asarray(base.dataobj).round() * 2  # min-max scaling makes it the same
    _save(nib.Nifti1Image(twice, moved), root / GOOD[1], np.int16)
    _save(base, root / GOOD[2])
    psr = nib.orientations.ornt_transform(nib.orientations.io_orientation(base.affine),
                                          nib.orientations.axcodes2ornt("PSR"))
    _save(base.as_reoriented(psr), root / GOOD[3])
    whole = (root / GOOD[2]).read_bytes()
    broken = root / BROKEN
    broken.write_bytes(whole[: len(whole) // 2])
    return root


def coarse_model(path: str | Path, voxel: float = 2.0, shape: int = 128) -> Path:
    """The pretrained MeshNet-26 on a ``shape``^3 grid of ``voxel`` mm (whole head at 2 mm)."""
    ckpt = checkpoint.load(registry.fetch(registry.DEFAULT_MODEL))
    ckpt.preprocess = PreprocessSpec("ras-minmax", shape=(shape,) * 3, voxel_size=voxel)
    ckpt.provenance = {**ckpt.provenance, "note": f"{registry.DEFAULT_MODEL}'s weights on a "
                       f"{shape}^3 grid of {voxel:g} mm, for quick demos"}
    return ckpt.save(path)


def bright_model(path: Path, t: float, voxel: int = 4) -> Path:
    """A MeshNet that passes the scaled intensity through (identity convolutions, BatchNorm
    that folds to identity) and whose head gives P(lesion) = sigmoid(50 (x - t)); its network
    grid is the example's own at ``voxel`` mm, so what it finds is known exactly."""
    model = MeshNet(Architecture(channels=2, dilations=(1, 2, 1)))
    with torch.no_grad():
        for block in model.blocks:
            block.conv.weight.zero_()
            block.conv.bias.zero_()
            block.conv.weight[0, 0, 1, 1, 1] = 1.0
            block.bn.running_mean.zero_()
            block.bn.running_var.fill_(1.0 - block.bn.eps)
            block.bn.weight.fill_(1.0)
            block.bn.bias.zero_()
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[1, 0] = SHARPNESS
        model.head.bias[1] = -SHARPNESS * t
    spec = PreprocessSpec("ras-minmax", shape=(256 // voxel,) * 3, voxel_size=float(voxel))
    return checkpoint.from_model(model.eval(), spec, note=f"bright > {t}").save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--voxel-size", type=int, default=4, help="mm per voxel (default 4)")
    p.add_argument("--model", default=None, help="also write the pretrained model on a "
                   "grid of this voxel size here")
    args = p.parse_args()
    build(args.folder, args.voxel_size)
    if args.model:
        coarse_model(args.model, float(args.voxel_size), 256 // args.voxel_size)


if __name__ == "__main__":
    main()
