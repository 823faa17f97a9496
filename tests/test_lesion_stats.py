"""Lesion statistics (volume, 26-connected components, centroids, side) against hand-made
geometry and an independent count (scipy.ndimage.label on the saved mask)."""

from __future__ import annotations

import argparse
import csv

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from napari_meshchop.cli import stats as stats_cli
from napari_meshchop.errors import InputError
from napari_meshchop.evaluation.lesions import lesion_stats

# LIA voxels of 1.2 x 0.9 x 1.5 mm, as a conformed scan but anisotropic: voxel axis 0 runs
# to the patient's left (RAS x falls), so a small index is on the right.
LIA = np.array([[-1.2, 0, 0, 30.0], [0, 0, 1.5, -20.0], [0, -0.9, 0, 25.0], [0, 0, 0, 1]])
SHAPE = (50, 40, 30)


def hand_made() -> np.ndarray:
    """Four 26-connected components: a 4x3x2 block (24 voxels), a 2x2x2 cube (8), two
    voxels that touch only at a corner (2, one component under 26-connectivity, two under
    6-connectivity) and a single voxel (1). Label values 1 and 3 (a Labels layer may hold
    several); all count as lesion."""
    m = np.zeros(SHAPE, dtype=np.uint8)
    m[5:9, 10:13, 4:6] = 1  # 24 voxels, centroid (6.5, 11, 4.5): right (small index)
    m[40:42, 20:22, 20:22] = 3  # 8 voxels, centroid (40.5, 20.5, 20.5): left
    m[30, 5, 5] = m[31, 6, 6] = 1  # corner neighbours, centroid (30.5, 5.5, 5.5): left
    m[20, 30, 25] = 1  # 1 voxel: index 20 < 24.5, the grid's centre: right
    return m


def ras(voxel) -> np.ndarray:
    return nib.affines.apply_affine(LIA, voxel)


def test_components_volumes_centroids_and_sides_of_hand_made_geometry():
    result = lesion_stats(hand_made(), LIA, keep_labels=True)
    voxel_ml = 1.2 * 0.9 * 1.5 / 1000
    assert result.voxel_ml == pytest.approx(voxel_ml)
    assert result.voxels == 35 and result.volume_ml == pytest.approx(35 * voxel_ml)
    assert [c.voxels for c in result.components] == [24, 8, 2, 1]
    assert result.largest_share == pytest.approx(24 / 35)
    expected = [(6.5, 11, 4.5), (40.5, 20.5, 20.5), (30.5, 5.5, 5.5), (20, 30, 25)]
    for c, centre in zip(result.components, expected):
        np.testing.assert_allclose(c.centroid_voxel, centre)
        np.testing.assert_allclose(c.centroid_mm, ras(centre))
        assert c.volume_ml == pytest.approx(c.voxels * voxel_ml)
    # No scan: the midline is the grid centre's RAS x; LIA puts small indices on the right.
    assert result.midline_from == "grid centre"
    assert result.midline_x == pytest.approx(ras([24.5, 19.5, 14.5])[0])
    assert [c.side for c in result.components] == ["right", "left", "left", "right"]
    # Bounding boxes and labels locate each component on the grid.
    assert result.components[0].bbox == ((5, 9), (10, 13), (4, 6))
    assert result.component_mask(3).sum() == 2 and result.component_mask(3)[30, 5, 5]
    assert (result.labels > 0).sum() == 35


def test_the_head_places_the_midline():
    """A head off the grid's centre: the midline follows the head, not the grid."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    centre = np.array([30.0, 20.0, 15.0])  # 5.5 voxels off the grid's centre in x
    head = (((grid - centre[:, None, None, None]) / np.array([15, 15, 12])[:, None, None, None])
            ** 2).sum(0) < 1
    image = 100.0 * head
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[27, 20, 15] = 1  # between the grid's centre (24.5) and the head's (30)
    with_head = lesion_stats(mask, LIA, image)
    assert with_head.midline_from == "head"
    assert with_head.midline_x == pytest.approx(ras(centre)[0], abs=0.3)
    assert with_head.components[0].side == "right"  # index 27 < 30: right of the head's
    assert lesion_stats(mask, LIA).components[0].side == "left"  # 27 > 24.5: left of the grid's


def test_an_empty_mask_has_no_components():
    result = lesion_stats(np.zeros(SHAPE, np.uint8), LIA)
    assert result.voxels == 0 and result.components == [] and result.largest_share == 0
    assert result.summary() == "no lesion voxels"
    with pytest.raises(ValueError, match="3D"):
        lesion_stats(np.zeros((4, 4)), LIA)


def _stats_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    stats_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_stats_command_agrees_with_an_independent_count(tmp_path, capsys):
    rng = np.random.default_rng(4)
    mask = (ndimage.gaussian_filter(rng.random(SHAPE), 1.5) > 0.56).astype(np.uint8)
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, LIA), path)
    assert _stats_command(["stats", str(path), "--csv", str(tmp_path / "c.csv")]) == 0
    out = capsys.readouterr().out
    # The oracle: scipy's own labelling of the saved file, counted here.
    saved = np.asarray(nib.load(path).dataobj) > 0
    labels, n = ndimage.label(saved, structure=np.ones((3, 3, 3)))
    sizes = sorted(np.bincount(labels.ravel())[1:], reverse=True)
    assert n > 3
    rows = list(csv.DictReader((tmp_path / "c.csv").read_text().splitlines()))
    assert [int(r["voxels"]) for r in rows] == sizes
    assert f"in {n} components" in out
    ml = saved.sum() * 1.2 * 0.9 * 1.5 / 1000
    assert f"{ml:.2f} mL" in out
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    np.testing.assert_allclose([float(rows[0][k]) for k in ("x_mm", "y_mm", "z_mm")],
                               ras(np.argwhere(largest).mean(0)), atol=0.01)


def test_stats_command_names_a_bad_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="bad.nii.gz: not a readable NIfTI"):
        _stats_command(["stats", str(bad)])
    mask = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(hand_made(), LIA), mask)
    other = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), LIA), other)
    with pytest.raises(InputError, match="scan.nii.gz: not on the grid"):
        _stats_command(["stats", str(mask), "--scan", str(other)])
