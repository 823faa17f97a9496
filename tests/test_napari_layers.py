"""layers.py: NIfTI grids <-> napari layer transforms, without Qt or a viewer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import oriented_affine
from nibabel.orientations import aff2axcodes, axcodes2ornt, inv_ornt_aff, ornt_transform

from napari_meshchop.errors import InputError
from napari_meshchop.plugin import layers


def _affine(codes, zooms=(1.0, 1.0, 1.0), degrees=0.0, origin=(0.0, 0.0, 0.0)):
    return oriented_affine(codes, zooms, degrees, origin, about="z")


GRIDS = {
    "RAS": _affine("RAS", origin=(-10, -12, -8)),
    "LIA": _affine("LIA", origin=(128.5, -92.9, 76.7)),
    "oblique anisotropic": _affine("LPS", zooms=(0.9, 1.2, 3.0), degrees=20,
                                   origin=(30, -40, 12)),
}


@pytest.fixture(params=list(GRIDS))
def grid(request):
    rng = np.random.default_rng(1)
    return rng.random((12, 10, 8)).astype(np.float32), GRIDS[request.param]


def test_layer_shows_every_voxel_at_its_scanner_position(grid):
    data, affine = grid
    view, transform = layers.layer_kwargs(data, affine)
    world = layers.data_to_world(**transform)
    assert np.shares_memory(view, data)  # a reorientation, not a copy
    rng = np.random.default_rng(2)
    for ijk in rng.integers(0, data.shape, size=(20, 3)):
        ras = affine @ [*ijk, 1]
        index = np.linalg.solve(world, layers.RAS_TO_WORLD @ ras)[:3]
        assert np.allclose(index, np.round(index), atol=1e-9)
        assert view[tuple(np.round(index).astype(int))] == data[tuple(ijk)]


def test_layer_axes_are_inferior_posterior_left_with_positive_scale(grid):
    data, affine = grid
    view, transform = layers.layer_kwargs(data, affine)
    assert aff2axcodes(layers.WORLD_TO_RAS @ layers.data_to_world(**transform)) == ("I", "P", "L")
    assert np.all(transform["scale"] > 0)
    assert sorted(transform["scale"]) == pytest.approx(sorted(np.sqrt((affine[:3, :3] ** 2).sum(0))))


def test_display_world_is_right_handed():
    # A mirror-image world would show every brain flipped in napari's 3D view.
    assert np.linalg.det(layers.RAS_TO_WORLD[:3, :3]) == pytest.approx(1.0)


def test_plain_grids_carry_no_rotation_or_shear():
    _, transform = layers.layer_kwargs(np.zeros((4, 5, 6)), GRIDS["LIA"])
    assert np.array_equal(transform["rotate"], np.eye(3))
    assert np.array_equal(transform["shear"], np.eye(3))


@pytest.mark.parametrize("seed", range(5))
def test_decompose_composes_back(seed):
    rng = np.random.default_rng(seed)
    matrix = np.eye(4)
    matrix[:3] = rng.normal(size=(3, 4))
    if seed == 0:
        matrix[:, 0] *= -1 if np.linalg.det(matrix) > 0 else 1  # a reflection
    parts = layers.decompose(matrix)
    assert np.allclose(layers.data_to_world(**parts), matrix, atol=1e-12)
    assert np.allclose(parts["rotate"] @ parts["rotate"].T, np.eye(3))
    assert np.allclose(np.tril(parts["shear"], -1), 0) and np.allclose(np.diag(parts["shear"]), 1)


def test_resolve_from_metadata_gives_back_the_native_grid(grid):
    data, affine = grid
    view, transform = layers.layer_kwargs(data, affine)
    geometry = layers.resolve(view.shape, layers.data_to_world(**transform),
                              {"affine": affine}, ["millimeter"] * 3)
    assert geometry.notes == []
    native, native_affine = layers.to_native(view, geometry)
    assert np.array_equal(native, data) and native_affine is not None
    assert np.array_equal(native_affine, affine)
    voxel = np.array([3, 4, 5, 1])
    assert np.allclose(geometry.affine @ voxel,
                       affine @ [*np.argwhere(data == view[3, 4, 5])[0], 1])


def test_resolve_without_metadata_reads_the_transform(grid):
    data, affine = grid
    view, transform = layers.layer_kwargs(data, affine)
    geometry = layers.resolve(view.shape, layers.data_to_world(**transform), {}, ["mm"] * 3)
    assert geometry.to_native is None and geometry.notes == []
    assert np.allclose(geometry.affine, affine @ inv_ornt_aff(
        ornt_transform(nib.io_orientation(affine), axcodes2ornt("IPL")), data.shape))


def test_plain_array_assumes_the_scale_in_mm_and_says_so():
    world = layers.data_to_world(scale=(2.0, 0.5, 0.5), translate=(0, 0, 0))
    geometry = layers.resolve((10, 20, 20), world, {}, ["pixel"] * 3, name="arr")
    assert np.allclose(geometry.voxel_size, (2.0, 0.5, 0.5))
    assert aff2axcodes(geometry.affine) == ("I", "P", "L")
    assert len(geometry.notes) == 1 and "'arr'" in geometry.notes[0]
    assert "2 x 0.5 x 0.5 mm" in geometry.notes[0]


def test_micrometre_units_become_mm():
    world = layers.data_to_world(scale=(1000.0, 1000.0, 1000.0), translate=(0, 0, 0))
    geometry = layers.resolve((4, 4, 4), world, {}, ["micrometer"] * 3)
    assert np.allclose(geometry.voxel_size, 1.0) and geometry.notes == []


def napari_nifti_style(data: np.ndarray, affine: np.ndarray, codes: str = "RAS"):
    """A layer as napari-nifti 0.0.20 makes one (its contract, re-derived here): medvol
    reorients the voxels (to RAS, or RPI for an LIA file...), the layer holds them with
    their axes reversed and negative scales, and metadata["affine"] is the RAS affine of
    the reoriented voxels, which its writer reverses the axes back onto."""
    ornt = ornt_transform(nib.io_orientation(affine), axcodes2ornt(codes))
    voxels = nib.orientations.apply_orientation(data, ornt)
    grid = affine @ inv_ornt_aff(ornt, data.shape)
    spacing = np.sqrt((grid[:3, :3] ** 2).sum(0))[::-1]
    return voxels.transpose(2, 1, 0), {
        "scale": -spacing, "translate": grid[:3, 3][::-1] + (np.array(voxels.shape) - 1) * 2,
        "metadata": {"affine": grid, "header": None, "coordinate_system": f"{codes}+"}}


@pytest.mark.parametrize("codes", ["RAS", "RPI", "PSL"])
def test_napari_nifti_layers_resolve_to_the_true_grid(codes):
    data, affine = np.random.default_rng(3).random((12, 10, 8)), GRIDS["oblique anisotropic"]
    layer, kwargs = napari_nifti_style(data, affine, codes)
    geometry = layers.resolve(layer.shape, layers.data_to_world(kwargs["scale"],
                                                                kwargs["translate"]),
                              kwargs["metadata"], ["pixel"] * 3)
    assert geometry.notes == []
    native, native_affine = layers.to_native(layer, geometry)
    assert np.array_equal(native_affine, kwargs["metadata"]["affine"])
    for ijk in np.random.default_rng(4).integers(0, layer.shape, size=(20, 3)):
        src = np.linalg.solve(affine, geometry.affine @ [*ijk, 1])[:3]
        assert np.allclose(src, np.round(src), atol=1e-9)
        assert data[tuple(np.round(src).astype(int))] == layer[tuple(ijk)]


def test_metadata_from_another_grid_is_ignored():
    data, affine = np.zeros((12, 10, 8)), GRIDS["RAS"]
    view, transform = layers.layer_kwargs(data, affine)
    transform["scale"] = transform["scale"] * 2  # e.g. the layer was downsampled
    geometry = layers.resolve(view.shape, layers.data_to_world(**transform),
                              {"affine": affine}, ["mm"] * 3)
    assert geometry.to_native is None
    assert np.allclose(geometry.voxel_size, 2.0)


@pytest.mark.parametrize("bad", [None, "x", np.eye(3), np.zeros((4, 4)), [[np.nan] * 4] * 4])
def test_unusable_metadata_affines_fall_back_to_the_transform(bad):
    world = layers.data_to_world(scale=(1, 1, 1), translate=(0, 0, 0))
    geometry = layers.resolve((4, 4, 4), world, {"affine": bad}, ["mm"] * 3)
    assert geometry.to_native is None


def test_to_nifti_checks_the_voxels_and_names_the_layer():
    geometry = layers.Geometry(np.eye(4))
    img = layers.to_nifti(np.arange(64, dtype=np.uint8).reshape(4, 4, 4), geometry, "scan")
    assert img.get_data_dtype() == np.float32 and np.array_equal(img.affine, np.eye(4))
    with pytest.raises(InputError, match="layer 'empty': is blank"):
        layers.to_nifti(np.zeros((4, 4, 4)), geometry, "empty")
