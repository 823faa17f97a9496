import nibabel as nib
import numpy as np
import pytest
from conftest import oblique_affine, phantom
from scipy import ndimage

from napari_meshchop.imaging.conform import conformed_affine
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


def test_conform_grid_is_the_conformed_affine():
    affine = oblique_affine()
    shape = (60, 50, 20)
    np.testing.assert_allclose(network_grid(affine, shape, PreprocessSpec()),
                               conformed_affine(affine, shape))


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
