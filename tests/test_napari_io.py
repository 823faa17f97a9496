"""Reader, writer and sample data: read, write, read again gives the file's own grid back."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLE_SCAN as SAMPLE
from conftest import SHARED_DATA, oriented_affine

from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.plugin import layers
from napari_meshchop.plugin.reader import napari_get_reader, read_layer
from napari_meshchop.plugin.writer import write_image, write_labels


@pytest.fixture(autouse=True)
def _mirror(monkeypatch):
    monkeypatch.setenv("MESHCHOP_MIRROR", str(SHARED_DATA))


def _affine(codes, zooms=(1.0, 1.0, 1.0), degrees=0.0, origin=(0.0, 0.0, 0.0)):
    return oriented_affine(codes, zooms, degrees, origin, about="x")


GRIDS = {
    "RAS": _affine("RAS", origin=(-15.5, -17.5, -9.5)),
    "LIA": _affine("LIA", origin=(128.5, -92.86, 76.7)),
    "oblique anisotropic": _affine("LPS", zooms=(0.8, 1.1, 3.5), degrees=17,
                                   origin=(30.2, -40.1, 12.7)),
}


def _scan(tmp_path, grid, dtype=np.int16, shape=(16, 14, 10), **header) -> Path:
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 1000).astype(dtype)
    img = nib.Nifti1Image(data, GRIDS[grid])
    img.header.set_sform(GRIDS[grid], code=header.get("sform", 1))
    img.header.set_qform(GRIDS[grid], code=header.get("qform", 1))
    path = tmp_path / f"{grid.replace(' ', '_')}.nii.gz"
    nib.save(img, path)
    return path


def _as_written(layer_tuple) -> dict:
    """The ``meta`` napari hands to a writer, for a layer as our reader makes it."""
    data, kwargs, _ = layer_tuple
    transform = {k: kwargs[k] for k in ("scale", "translate", "rotate", "shear")}
    return {**transform, "affine": np.eye(4), "metadata": kwargs["metadata"],
            "units": kwargs["units"], "name": kwargs["name"]}


@pytest.mark.parametrize("grid", list(GRIDS))
def test_image_round_trip_keeps_voxels_affine_and_codes(tmp_path, grid):
    path = _scan(tmp_path, grid, sform=2, qform=1)
    first = read_layer(path)
    assert first[2] == "image"
    out = write_image(str(tmp_path / "out.nii.gz"), first[0], _as_written(first))[0]
    src, back = nib.load(path), nib.load(out)
    assert back.shape == src.shape
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj))
    assert back.get_data_dtype() == src.get_data_dtype()
    assert np.array_equal(back.affine, src.affine)
    assert int(back.header["sform_code"]) == 2 and int(back.header["qform_code"]) == 1
    again = read_layer(out)
    assert np.array_equal(again[0], first[0])
    for key in ("scale", "translate", "rotate", "shear"):
        assert np.array_equal(again[1][key], first[1][key])


@pytest.mark.parametrize("grid", list(GRIDS))
def test_labels_round_trip_on_the_source_grid(tmp_path, grid):
    path = _scan(tmp_path, grid)
    image = read_layer(path)
    mask = (image[0] > 700).astype(np.uint8)  # drawn on the layer, in napari's order
    meta = _as_written(image)
    out = write_labels(str(tmp_path / "mask.nii.gz"), mask, meta)[0]
    src, written = nib.load(path), nib.load(out)
    assert written.shape == src.shape and np.array_equal(written.affine, src.affine)
    assert written.get_data_dtype() == np.uint8
    assert written.header.get_intent()[0] == "label"
    expected = np.asarray(src.dataobj) > 700  # the same voxels, on the file's own grid
    assert np.array_equal(np.asarray(written.dataobj) > 0, expected)
    labels = read_layer(out)
    assert labels[2] == "labels" and labels[0].dtype == np.uint8
    assert np.array_equal(labels[0], mask)


def test_real_scan_round_trip(tmp_path, real_data):
    image = read_layer(SAMPLE)
    assert image[0].shape == (256, 256, 256) and image[0].dtype == np.uint8
    assert image[1]["metadata"]["path"] == str(SAMPLE)
    out = write_image(str(tmp_path / "scan.nii.gz"), image[0], _as_written(image))[0]
    src, back = nib.load(SAMPLE), nib.load(out)
    assert np.array_equal(back.affine, src.affine)
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj))


def test_labels_without_metadata_use_the_layer_transform(tmp_path):
    """A Labels layer drawn in napari (no metadata) still lands on the scan's voxels."""
    path = _scan(tmp_path, "LIA")
    image = read_layer(path)
    mask = np.zeros(image[0].shape, dtype=np.int32)
    mask[3, 4, 5] = 300  # needs uint16
    meta = {**_as_written(image), "metadata": {}}
    written = nib.load(write_labels(str(tmp_path / "drawn"), mask, meta)[0])
    assert written.get_data_dtype() == np.uint16
    assert int(written.header["sform_code"]) == 1
    src = nib.load(path)
    ijk = np.argwhere(np.asarray(written.dataobj) == 300)[0]
    src_ijk = np.linalg.solve(src.affine, written.affine @ [*ijk, 1])[:3]
    assert np.allclose(src_ijk, np.round(src_ijk), atol=1e-6)
    assert np.asarray(src.dataobj)[tuple(np.round(src_ijk).astype(int))] == image[0][3, 4, 5]


def test_writer_refuses_what_nifti_cannot_hold(tmp_path):
    meta = {"scale": [1, 1], "translate": [0, 0], "metadata": {}}
    with pytest.raises(MeshchopError, match="2D layer"):
        write_image(str(tmp_path / "flat.nii.gz"), np.ones((4, 4)), meta)
    with pytest.raises(MeshchopError, match="integers"):
        write_labels(str(tmp_path / "x.nii.gz"), np.ones((4, 4, 4)), meta)


def test_reader_returns_none_for_what_it_cannot_read(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    four_d = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), four_d)
    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), flat)
    for path in (text, fake, four_d, flat, tmp_path / "missing.nii.gz", tmp_path, 42):
        assert napari_get_reader(os.fspath(path) if isinstance(path, Path) else path) is None
    assert napari_get_reader([str(text), str(fake)]) is None
    assert callable(napari_get_reader(str(_scan(tmp_path, "RAS"))))


def test_truncated_file_raises_a_clear_error(tmp_path):
    path = _scan(tmp_path, "RAS", shape=(40, 40, 40))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    reader = napari_get_reader(str(path))
    assert reader is not None  # the header is fine; the voxels are not
    with pytest.raises(InputError, match=r"ras\.nii\.gz|RAS\.nii\.gz"):
        reader(str(path))


def test_binary_and_label_intent_files_open_as_labels(tmp_path):
    mask = np.zeros((6, 6, 6), np.float32)
    mask[2:4, 2:4, 2:4] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "m.nii.gz")
    seg = nib.Nifti1Image(np.arange(216, dtype=np.int16).reshape(6, 6, 6), np.eye(4))
    seg.header.set_intent("label")
    nib.save(seg, tmp_path / "seg.nii.gz")
    data, kwargs, kind = read_layer(tmp_path / "m.nii.gz")
    assert kind == "labels" and data.dtype == np.uint8 and data.sum() == 8
    assert kwargs["name"] == "m"
    assert read_layer(tmp_path / "seg.nii.gz")[2] == "labels"


@pytest.mark.filterwarnings("ignore:Non-orthogonal slicing")  # napari shows oblique grids unrotated in 2D
def test_manifest_reader_writer_and_sample(make_napari_viewer, tmp_path, real_data):
    import napari

    viewer = make_napari_viewer()
    path = _scan(tmp_path, "oblique anisotropic")
    (layer,) = viewer.open(str(path), plugin="napari-meshchop")
    assert layer.name == "oblique_anisotropic"
    assert tuple(str(u) for u in layer.units) == ("millimeter",) * 3
    assert np.array_equal(layer.metadata["affine"], nib.load(path).affine)
    out = tmp_path / "saved.nii.gz"
    napari.save_layers(str(out), [layer], plugin="napari-meshchop")
    assert np.array_equal(nib.load(out).affine, nib.load(path).affine)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), np.asarray(nib.load(path).dataobj))
    labels = viewer.add_labels((layer.data > 500).astype(np.uint8), metadata=layer.metadata,
                               scale=layer.scale, translate=layer.translate,
                               rotate=layer.rotate, shear=layer.shear, units=layer.units)
    napari.save_layers(str(tmp_path / "mask.nii.gz"), [labels], plugin="napari-meshchop")
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert np.array_equal(mask.affine, nib.load(path).affine)
    assert np.array_equal(np.asarray(mask.dataobj) > 0, np.asarray(nib.load(path).dataobj) > 500)

    (sample,) = viewer.open_sample("napari-meshchop", "sub-M2265_T2w")
    assert sample.data.shape == (256, 256, 256)
    assert np.array_equal(sample.metadata["affine"], nib.load(SAMPLE).affine)
    world = layers.WORLD_TO_RAS @ layers.data_to_world(
        sample.scale, sample.translate, sample.rotate, sample.shear, sample.affine.affine_matrix)
    assert nib.aff2axcodes(world) == ("I", "P", "L")


def test_sample_is_verified_like_the_weights(monkeypatch, tmp_path):
    from napari_meshchop.plugin.sample_data import arc_stroke_t2w

    (tmp_path / "sub-M2265_T2w.nii.gz").write_bytes(b"tampered")
    monkeypatch.setenv("MESHCHOP_MIRROR", str(tmp_path))
    with pytest.raises(InputError, match="sha256"):
        arc_stroke_t2w()


def test_a_plain_open_of_nifti_uses_our_reader_and_no_other_gz(make_napari_viewer, tmp_path):
    """File > Open and ``napari scan.nii.gz`` pass no plugin: napari goes by its reader
    preferences. Once the plugin has run (here its widget opens), .nii and .nii.gz are ours;
    other .gz files are not, and a user's own choice for NIfTI stays."""
    from napari.errors import MultipleReaderError
    from napari.plugins.utils import get_preferred_reader

    viewer = make_napari_viewer()
    path = _scan(tmp_path, "LIA")
    with pytest.raises(MultipleReaderError):  # napari's, ours (and napari-nifti's)
        viewer.open(str(path), plugin=None)
    viewer.window.add_plugin_dock_widget("napari-meshchop", "Segment stroke lesion")

    (layer,) = viewer.open(str(path), plugin=None)
    assert np.array_equal(layer.metadata["affine"], nib.load(path).affine)  # our reader
    viewer.window._qt_viewer._qt_open([str(path)], stack=False)  # File > Open's code path
    assert viewer.layers[-1].source.reader_plugin == "napari-meshchop"
    nii = tmp_path / "plain.nii"
    nib.save(nib.load(path), nii)
    assert viewer.open(str(nii), plugin=None)[0].source.reader_plugin == "napari-meshchop"
    for other in ("table.csv.gz", "archive.tar.gz", "brain.mgz"):
        assert get_preferred_reader(tmp_path / other) is None


def test_reader_preferences_keep_the_users_choice_and_narrow_a_gz_one(tmp_path):
    from napari.plugins.utils import get_preferred_reader
    from napari.settings import get_settings

    from napari_meshchop.plugin.reader import prefer_for_nifti

    plugins = get_settings().plugins
    # What napari's "remember for .gz files" stores, and a user's own pick for .nii.
    plugins.extension2reader = {"*.gz": "napari-meshchop", "*.nii": "napari-nifti"}
    assert prefer_for_nifti()
    assert plugins.extension2reader == {"*.nii": "napari-nifti", "*.nii.gz": "napari-meshchop"}
    assert get_preferred_reader(tmp_path / "x.tar.gz") is None
    assert get_preferred_reader(tmp_path / "x.nii.gz") == "napari-meshchop"
    assert not prefer_for_nifti()  # settled: nothing changes, nobody is told again
