"""Draw the lesion that ``meshchop segment`` found over slices of the scan (docs/images).

    python docs/make_figures.py SCAN.nii.gz MASK.nii.gz docs/images/sub-M2265_lesion.png
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402


def lesion_figure(scan_path: str, mask_path: str, out_path: str) -> None:
    # Reorient both to RAS so that rows and columns mean the same in every panel.
    scan = np.asarray(nib.as_closest_canonical(nib.load(scan_path)).dataobj, dtype=np.float32)
    mask = np.asarray(nib.as_closest_canonical(nib.load(mask_path)).dataobj) > 0
    centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int) if mask.any() else (
        np.array(scan.shape) // 2)
    views = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for ax, (name, axis) in zip(axes, views):
        img = np.take(scan, centre[axis], axis=axis).T
        les = np.take(mask, centre[axis], axis=axis).T
        ax.imshow(img, cmap="gray", origin="lower", vmax=np.percentile(scan, 99.5))
        ax.imshow(np.ma.masked_where(~les, les), cmap="autumn", alpha=0.55, origin="lower")
        ax.set_title(f"{name} slice {centre[axis]}", color="white")
        ax.axis("off")
        if axis != 0:  # RAS: x grows to the right, so the viewer sees the patient's left on the left
            ax.text(0.02, 0.02, "L", color="white", transform=ax.transAxes)
            ax.text(0.95, 0.02, "R", color="white", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80, facecolor="black")
    plt.close(fig)


if __name__ == "__main__":
    lesion_figure(*sys.argv[1:4])
