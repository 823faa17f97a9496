import nibabel as nib
import numpy as np
import pytest
from conftest import oblique_affine, phantom
from scipy import ndimage

from napari_meshchop.imaging.preprocess import (
    PreprocessSpec,
    network_grid,
    prepare,
    prepare_mask,
    to_source,
)


def arc_meshchop_reference(img: nib.Nifti1Image, shape) -> np.ndarray:
    """arc-meshchop's training preprocessing, step by step as its README describes it."""
    ras = nib.as_closest_canonical(img)
    data = np.asarray(ras.dataobj, dtype=np.float32)
    spacing = np.sqrt((ras.affine[:3, :3] ** 2).sum(axis=0))
    data = ndimage.zoom(data, spacing / 1.0, order=1)
    out = np.zeros(shape, np.float32)
    src, dst = [], []
    for n, t in zip(data.shape, shape):
        if n > t:
            src.append(slice((n - t) // 2, (n - t) // 2 + t))
            dst.append(slice(0, t))
        else:
            src.append(slice(0, n))
            dst.append(slice((t - n) // 2, (t - n) // 2 + n))
    out[tuple(dst)] = data[tuple(src)]
    return (out - out.min()) / (out.max() - out.min())


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("P", "S", "R")])
def test_ras_minmax_reproduces_arc_meshchop_training(axcodes):
    data = phantom((41, 30, 22))
    affine = np.diag([1.5, 0.8, 2.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    # Re-store the same image in another voxel order: the preprocessing must not care.
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(axcodes))
    img = img.as_reoriented(ornt)
    assert nib.aff2axcodes(img.affine) == axcodes
    spec = PreprocessSpec("ras-minmax", shape=(48, 40, 36))  # crops some axes, pads others
    prepared = prepare(img, spec)
    expected = arc_meshchop_reference(img, spec.shape)
    assert prepared.volume.shape == spec.shape
    np.testing.assert_allclose(prepared.volume, expected, atol=2e-5)


def _axis_aligned(zooms, origin) -> np.ndarray:
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = origin
    return affine


@pytest.mark.parametrize(("affine", "shape", "expected"), [
    # 2 mm RAS, origin (-10, -20, -30): the centre voxel N/2 = (30, 25, 10) is at world
    # (50, 30, -10) and lands on LIA voxel 128, which is (-128, 128, -128) mm from the origin.
    (_axis_aligned([2.0, 2.0, 2.0], [-10.0, -20.0, -30.0]), (60, 50, 20),
     [[-1, 0, 0, 178], [0, 0, 1, -98], [0, -1, 0, 118], [0, 0, 0, 1]]),
    # 1 mm LPS, origin (100, 80, -40): centre (32, 32, 16) at world (68, 48, -24).
    (_axis_aligned([-1.0, -1.0, 1.0], [100.0, 80.0, -40.0]), (64, 64, 32),
     [[-1, 0, 0, 196], [0, 0, 1, -80], [0, -1, 0, 104], [0, 0, 0, 1]]),
])
def test_conform_grid_by_hand(affine, shape, expected):
    """FreeSurfer's conformed grid: 1 mm LIA, the input's voxel N/2 on voxel 128."""
    np.testing.assert_allclose(network_grid(affine, shape, PreprocessSpec()), expected,
                               atol=1e-12)


def test_ras_minmax_grid_by_hand():
    """2 mm LAS voxels, 10 x 20 x 10: reoriented to RAS (x flipped), zoomed to 1 mm the way
    scipy.ndimage.zoom does (corner-aligned: zoomed voxel o is source voxel o (n-1)/(m-1)),
    then centred in 32^3: x and z (20 zoomed voxels) padded by 6, y (40) cropped by 4."""
    affine = _axis_aligned([-2.0, 2.0, 2.0], [9.0, 0.0, 5.0])  # voxel i = 9 is at x = -9
    grid = network_grid(affine, (10, 20, 10), PreprocessSpec("ras-minmax", shape=(32,) * 3))
    # x: world = -9 + 2 (n - 6) 9/19; y: world = 2 (n + 4) 19/39; z like x from 5.
    expected = np.diag([18 / 19, 38 / 39, 18 / 19, 1.0])
    expected[:3, 3] = [-9 - 108 / 19, 152 / 39, 5 - 108 / 19]
    np.testing.assert_allclose(grid, expected, atol=1e-12)


def test_prediction_maps_back_onto_the_input_grid():
    # A ball defined in world space, "predicted" on the network grid, must land on the
    # same world positions of the (oblique, anisotropic) input grid.
    img = nib.Nifti1Image(phantom((50, 60, 24)), oblique_affine(zooms=(1.1, 0.9, 2.5)))
    prepared = prepare(img, PreprocessSpec("ras-minmax", shape=(96, 96, 96)))
    centre = img.affine @ np.array([25, 30, 12, 1.0])

    def ball(affine, shape):
        ijk = np.indices(shape).reshape(3, -1)
        xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
        return (np.linalg.norm(xyz - centre[:3, None], axis=0) < 12).reshape(shape)

    predicted = ball(prepared.affine, prepared.volume.shape).astype(np.float32)
    back = to_source(predicted, prepared) > 0.5
    truth = ball(img.affine, img.shape)
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.95, dice


def test_mask_follows_its_image_and_binarises_odd_slopes():
    data = phantom((30, 30, 30))
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    mask_data = np.zeros((30, 30, 30), np.int16)
    mask_data[10:20, 12:18, 5:25] = 1
    mask = nib.Nifti1Image(mask_data, img.affine)
    mask.header.set_slope_inter(0.0039, 0)  # stored 1 reads as 0.0039: still lesion
    spec = PreprocessSpec("ras-minmax", shape=(64, 64, 64))
    on_grid = prepare_mask(mask, img, spec)
    assert on_grid.dtype == np.uint8 and set(np.unique(on_grid)) == {0, 1}
    # 2 mm voxels zoomed to 1 mm: about 8 network voxels per source voxel.
    assert on_grid.sum() == pytest.approx(8 * mask_data.sum(), rel=0.15)


def test_spec_validation_and_round_trip():
    spec = PreprocessSpec("ras-minmax", shape=(32, 32, 32))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown preprocessing"):
        PreprocessSpec("zscore")
    with pytest.raises(ValueError, match="256"):
        PreprocessSpec("conform", shape=(128, 128, 128))


def test_conform_masks_land_on_their_image_grid():
    from napari_meshchop.imaging.conform import conform_mask

    img = nib.Nifti1Image(phantom(), oblique_affine())
    lesion = (phantom(seed=3) < 50).astype(np.uint8)
    same_header = nib.Nifti1Image(lesion, img.affine)
    on_grid = prepare_mask(same_header, img, PreprocessSpec())
    np.testing.assert_array_equal(on_grid, np.asarray(conform_mask(same_header).dataobj))
    # A mask stored on a cropped grid (another header) still lands where its image is.
    cropped = nib.Nifti1Image(lesion[5:], img.affine @ nib.affines.from_matvec(np.eye(3), [5, 0, 0]))
    np.testing.assert_array_equal(prepare_mask(cropped, img, PreprocessSpec())[on_grid == 0], 0)
    assert (prepare_mask(cropped, img, PreprocessSpec()) == on_grid).mean() > 0.999
