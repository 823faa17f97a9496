"""A tiny local replica of hugging-science/arc-aphasia-bids, built with `datasets` itself.

Same columns and feature types as the hub's dataset (structural modalities are lists of
NIfTI, ``lesion`` one NIfTI or null, every NIfTI stored as ``{"bytes": .nii.gz, "path":
BIDS file name}``), and the same layout: ``data/train-XXXXX-of-NNNNN.parquet``, one row
(one session) per file. The volumes are a few thousand voxels. The rows cover what the
download must handle:

- two SPACE sessions with a mask (one 2x accelerated, one not);
- a turbo spin echo session with a mask (excluded by the paper);
- a SPACE session without a mask, and an fMRI-only session without T2w or mask;
- sub-M2105 ses-964 with two T2w runs (6 listed first, then 11) and the mask on run 11,
  in PSR orientation as in the real data;
- a mask stored as 1 with scl_slope 1/255 (0.0039 after scaling);
- sub-M2005's T2w stored as plain NIfTI bytes under its ``.nii.gz`` name, as ``datasets``
  stores a nibabel image that it encodes itself.

``build(root, mismatch=True)`` adds a session whose mask is on another grid than its T2w.

Run ``python tests/arc_replica.py FOLDER`` to write one (the docs use it).
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (14, 12, 10)


def features():
    from datasets import Features, List, Nifti, Value

    return Features({
        "subject_id": Value("string"), "session_id": Value("string"),
        "t1w": List(Nifti()), "t2w": List(Nifti()), "t2w_acquisition": Value("string"),
        "flair": List(Nifti()), "bold_naming40": List(Nifti()), "bold_rest": List(Nifti()),
        "dwi": List(Nifti()), "dwi_bvals": List(Value("string")),
        "dwi_bvecs": List(Value("string")), "sbref": List(Nifti()), "lesion": Nifti(),
        "age_at_stroke": Value("float32"), "sex": Value("string"), "race": Value("string"),
        "wab_aq": Value("float32"), "wab_days": Value("float32"), "wab_type": Value("string"),
    })


def affine(orientation: str = "RAS", zooms=(1.0, 1.1, 1.2), origin=(-7.0, -6.0, -5.0)):
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    aff = np.zeros((4, 4))
    for column, code in enumerate(orientation):
        row, sign = axes[code]
        aff[row, column] = sign * zooms[column]
    aff[:3, 3] = origin
    aff[3, 3] = 1
    return aff


def lesion_of(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    dist = sum((grid[i] - centre[i]) ** 2 for i in range(3))
    return dist <= radius**2


def t2w_volume(shape, seed, lesion) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = ((grid**2).sum(0) < 0.9).astype(np.float32)
    img = 400 * head + 300 * lesion * head + rng.normal(0, 10, shape)
    return np.clip(img, 0, None).astype(np.int16)


def nifti_bytes(data, aff, slope=None, plain=False) -> bytes:
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    return img.to_bytes() if plain else gzip.compress(img.to_bytes(), mtime=0)


def nifti(name, data, aff, slope=None, plain=False) -> dict:
    """A row's NIfTI: gzipped bytes, or with ``plain`` the bytes ``datasets`` stores for a
    nibabel image (``Nifti.encode_example``: ``img.to_bytes()``), whatever ``name`` says."""
    return {"bytes": nifti_bytes(data, aff, slope, plain), "path": name}


def _row(subject, session, *, t2w=(), acquisition=None, lesion=None, t1w=False, bold=False):
    prefix = f"{subject}_{session}"
    aff = affine()
    return {
        "subject_id": subject, "session_id": session,
        "t1w": [nifti(f"{prefix}_acq-tfl3_T1w.nii.gz", t2w_volume(SHAPE, 99, 0), aff)]
        if t1w else [],
        "t2w": list(t2w), "t2w_acquisition": acquisition,
        "flair": [],
        "bold_naming40": [nifti(f"{prefix}_task-naming40_bold.nii.gz",
                                np.ones((4, 4, 3, 2), np.int16), aff)] if bold else [],
        "bold_rest": [], "dwi": [], "dwi_bvals": [], "dwi_bvecs": [], "sbref": [],
        "lesion": lesion, "age_at_stroke": 61.0, "sex": "M", "race": "w", "wab_aq": 72.5,
        "wab_days": 900.0, "wab_type": "Anomic",
    }


def pair(subject, session, acq_label, run, *, seed, orientation="RAS", slope=None,
         mask_shape=None, centre=(8, 6, 5), radius=2.5, plain_image=False):
    """A T2w run and the lesion mask drawn on it, named as in ARC."""
    name = f"{subject}_{session}_acq-{acq_label}_run-{run}_T2w"
    aff = affine(orientation)
    lesion = lesion_of(SHAPE, centre, radius)
    image = nifti(f"{name}.nii.gz", t2w_volume(SHAPE, seed, lesion), aff, plain=plain_image)
    mask_data = lesion.astype(np.uint8)
    if mask_shape is not None:
        mask_data = np.zeros(mask_shape, np.uint8)
        mask_data[2:5, 2:5, 2:5] = 1
    mask = nifti(f"{name}_desc-lesion_mask.nii.gz", mask_data, aff, slope)
    return image, mask


def rows(mismatch: bool = False) -> list[dict]:
    out = []
    image, mask = pair("sub-M2001", "ses-1253", "spc3", 3, seed=1)
    out.append(_row("sub-M2001", "ses-1253", t2w=[image], acquisition="space_no_accel",
                    lesion=mask, t1w=True))
    image, mask = pair("sub-M2002", "ses-1441", "tse3", 4, seed=2)
    out.append(_row("sub-M2002", "ses-1441", t2w=[image], acquisition="turbo_spin_echo",
                    lesion=mask))
    image, _ = pair("sub-M2003", "ses-2000", "spc3p2", 5, seed=3)
    out.append(_row("sub-M2003", "ses-2000", t2w=[image], acquisition="space_2x", t1w=True))
    out.append(_row("sub-M2004", "ses-10", bold=True))
    image, mask = pair("sub-M2005", "ses-4334", "spc3p2", 7, seed=5, radius=3.5,
                       plain_image=True)
    out.append(_row("sub-M2005", "ses-4334", t2w=[image], acquisition="space_2x", lesion=mask))
    if mismatch:
        image, mask = pair("sub-M2010", "ses-50", "spc3p2", 2, seed=10, mask_shape=(14, 12, 9))
        out.append(_row("sub-M2010", "ses-50", t2w=[image], acquisition="space_2x",
                        lesion=mask))
    run6, _ = pair("sub-M2105", "ses-964", "spc3", 6, seed=60, orientation="PSR",
                   centre=(3, 3, 3))
    run11, mask = pair("sub-M2105", "ses-964", "spc3", 11, seed=61, orientation="PSR")
    out.append(_row("sub-M2105", "ses-964", t2w=[run6, run11], acquisition="space_no_accel",
                    lesion=mask))
    image, mask = pair("sub-M2269", "ses-767", "spc3p2", 4, seed=7, slope=1 / 255,
                       radius=2.0)
    out.append(_row("sub-M2269", "ses-767", t2w=[image], acquisition="space_2x", lesion=mask))
    return out


# What the default replica holds, for the tests.
EXPECTED = {"rows": 7, "pairs": {"space_2x": 2, "space_no_accel": 2},
            "excluded": {"no-lesion": 2, "tse": 1}}


def build(root, mismatch: bool = False, layout: str = "parquet") -> Path:
    """Write the replica to ``root``: parquet shards as on the hub, or ``save_to_disk``."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    root = Path(root)
    data = rows(mismatch)
    if layout == "disk":
        Dataset.from_list(data, features=features()).save_to_disk(str(root))
        return root
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(data):
        shard = Dataset.from_list([row], features=features())
        shard.to_parquet(str(root / "data" / f"train-{i:05d}-of-{len(data):05d}.parquet"))
    (root / "README.md").write_text(
        "---\nlicense: cc0-1.0\n---\n# ARC replica\n\nA few tiny synthetic sessions laid out "
        "like hugging-science/arc-aphasia-bids, for offline tests.\n")
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/arc_replica.py FOLDER")
    print(build(sys.argv[1]))
