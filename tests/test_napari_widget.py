"""The Segment widget, opened through the manifest and driven like a user would.

Fast tests use a tiny untrained MeshNet on small synthetic scans; the real-data test
segments the ARC sample with the pretrained MeshNet-26, sharing the network pass of the
session's one real segmentation (conftest.real_segmentation).
"""

from __future__ import annotations

from pathlib import Path

import network_memo
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, require_module

from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.network import checkpoint
from napari_meshchop.network.model import Architecture, MeshNet
from napari_meshchop.plugin import layers, save
from napari_meshchop.plugin.reader import read_layer
from napari_meshchop.plugin.widgets.segment import CHECKPOINT, SegmentWidget

TRANSFORM = ("scale", "translate", "rotate", "shear")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, isolated_settings):
    """Registry files from the local mirror; the widget's QSettings in tmp_path."""
    monkeypatch.setenv("MESHCHOP_MIRROR", str(SHARED_DATA))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = MeshNet(Architecture(channels=2))
    ck = checkpoint.from_model(model.eval(), PreprocessSpec(name="ras-minmax", shape=(32,) * 3))
    return ck.save(tmp_path_factory.mktemp("model") / "tiny.pt")


def _scan_file(tmp_path, affine=None, shape=(40, 36, 30), name="scan") -> Path:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = (grid**2).sum(0) < 0.8
    lesion = ((grid - np.array([0.4, 0.1, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.05
    data = (100 * head - 60 * (lesion & head)).astype(np.int16)
    if affine is None:  # LIA, like conformed FreeSurfer scans
        affine = np.array([[-1.2, 0, 0, 20], [0, 0, 1.0, -15], [0, -0.9, 0, 18], [0, 0, 0, 1]])
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _open_widget(viewer, model: Path | None = None) -> SegmentWidget:
    _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop", "Segment stroke lesion")
    if model is not None:
        widget._model.value = CHECKPOINT
        widget._checkpoint.value = model
    widget._device.value = "cpu"
    return widget


def _run(qtbot, widget, timeout_s=60):
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout_s * 1000)


def _errors(monkeypatch):
    """Collect the error notifications: the widget's own and those of failed workers."""
    import napari_meshchop.plugin.widgets.feedback as feedback
    import napari_meshchop.plugin.widgets.segment as module

    shown: list[str] = []
    monkeypatch.setattr(module, "show_error", shown.append)
    monkeypatch.setattr(feedback, "show_error", shown.append)
    return shown


def _assert_overlays(labels, image):
    assert labels.data.dtype == np.uint8 and labels.data.shape == image.data.shape
    for key in TRANSFORM:
        assert np.array_equal(getattr(labels, key), getattr(image, key)), key
    assert np.array_equal(labels.affine.affine_matrix, image.affine.affine_matrix)
    assert labels.units == image.units


def test_each_run_is_a_new_layer_named_by_scan_and_model_and_saves_on_the_source_grid(
        make_napari_viewer, qtbot, tiny_model, tmp_path):
    viewer = make_napari_viewer()
    path = _scan_file(tmp_path)
    (image,) = viewer.open(str(path), plugin="napari-meshchop")
    widget = _open_widget(viewer, tiny_model)
    assert widget._image.value is image
    assert widget._device.choices[:2] == ("auto", "cpu")
    assert "36 x 30 x 40 voxels of 0.9 x 1 x 1.2 mm" in widget._geometry.value
    seen, show_progress = [], widget._on_progress
    widget._on_progress = lambda event: (seen.append(event.stage), show_progress(event))

    _run(qtbot, widget)
    labels = viewer.layers["scan_lesion_tiny"]
    _assert_overlays(labels, image)
    assert set(np.unique(labels.data)) <= {0, 1}
    # In 3D: a see-through scan with the lesion drawn inside it, in front of the brain.
    assert image.rendering == "attenuated_mip" and labels.blending == "translucent_no_depth"
    assert "mL" in widget._result.value and "tiny.pt on cpu" in widget._result.value
    assert set(seen) >= {"load", "preprocess", "network", "map back"}
    assert widget._time.value.startswith("Took ")
    assert labels.metadata["lesion_ml"] == pytest.approx(
        labels.data.sum() * 1.2 * 0.9 / 1000, rel=1e-6)

    labels.opacity = 0.3
    _run(qtbot, widget)  # a second run never touches the first result
    assert [layer.name for layer in viewer.layers] == [
        "scan", "scan_lesion_tiny", "scan_lesion_tiny_probability", "scan_lesion_tiny_2",
        "scan_lesion_tiny_2_probability"]  # each result beside its hidden P(lesion)
    assert viewer.layers["scan_lesion_tiny"] is labels and labels.opacity == 0.3
    assert np.array_equal(viewer.layers["scan_lesion_tiny_2"].data, labels.data)

    # napari's own save path (File > Save Selected Layers with our file type). The plugin
    # is named: with napari-nifti installed, its writer would take .nii.gz first.
    out = tmp_path / "mask.nii.gz"
    viewer.layers.selection = {labels}
    assert viewer.layers.save(str(out), selected=True, plugin="napari-meshchop") == [str(out)]
    mask, src = nib.load(out), nib.load(path)
    assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine)
    assert int(np.asarray(mask.dataobj).sum()) == int(labels.data.sum())
    # The widget's Save button proposes <scan folder>/<layer name>.nii.gz, and a bare name
    # still gives NIfTI on the scan's grid.
    assert save.proposed_path(viewer.layers["scan_lesion_tiny_2"]) == tmp_path / "scan_lesion_tiny_2.nii.gz"
    assert widget.save(widget.last, tmp_path / "bare") == [str(tmp_path / "bare.nii.gz")]
    assert np.array_equal(nib.load(tmp_path / "bare.nii.gz").affine, src.affine)


def test_same_mask_from_our_reader_a_plain_array_and_a_napari_nifti_layer(
        make_napari_viewer, qtbot, tiny_model, tmp_path):
    """The network sees the same voxels however the scan reached napari."""
    from test_napari_layers import napari_nifti_style

    viewer = make_napari_viewer()
    path = _scan_file(tmp_path, affine=np.diag([1.0, 1.0, 1.0, 1.0]), shape=(30, 34, 38))
    src = nib.load(path)
    data = np.asarray(src.dataobj)
    ours = viewer.add_layer(_layer(read_layer(path)))
    sar, kwargs = napari_nifti_style(data, src.affine)
    theirs = viewer.add_image(sar, name="nifti", **kwargs)
    plain = viewer.add_image(np.ascontiguousarray(ours.data), name="plain")
    widget = _open_widget(viewer, tiny_model)
    masks = {}
    for layer in (ours, theirs, plain):
        widget._image.value = layer
        if layer is plain:
            assert "assumed voxels of 1 x 1 x 1 mm" in widget._geometry.value
        else:
            assert "assumed" not in widget._geometry.value
        _run(qtbot, widget)
        labels = viewer.layers[f"{layer.name}_lesion_tiny"]
        _assert_overlays(labels, layer)
        masks[layer.name] = labels.data
    assert masks["scan"].any()
    # Back to the file's RAS voxel order: ours is I,P,L; napari-nifti's is S,A,R.
    assert np.array_equal(masks["scan"][::-1, ::-1, ::-1].transpose(2, 1, 0),
                          masks["nifti"].transpose(2, 1, 0))
    assert np.array_equal(masks["plain"], masks["scan"])


def _layer(layer_tuple):
    from napari.layers import Layer

    return Layer.create(*layer_tuple)


def test_cancel_leaves_no_layer_and_keeps_the_last_result(
        make_napari_viewer, qtbot, tiny_model, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(_scan_file(tmp_path)), plugin="napari-meshchop")
    widget = _open_widget(viewer, tiny_model)
    shown = _errors(monkeypatch)

    widget.run()
    widget.cancel()  # before the worker's first stop check: deterministic
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert [layer.name for layer in viewer.layers] == ["scan"]
    assert widget._status.value.startswith("Cancelled") and shown == []
    assert widget._run.enabled and not widget._cancel.enabled

    _run(qtbot, widget)
    before = viewer.layers["scan_lesion_tiny"].data.copy()
    widget.run()
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert len(viewer.layers) == 3  # the scan, the last result and its P(lesion)
    assert np.array_equal(viewer.layers["scan_lesion_tiny"].data, before)


def test_errors_are_notifications_with_the_core_message(
        make_napari_viewer, qtbot, tiny_model, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    widget = _open_widget(viewer, tiny_model)
    shown = _errors(monkeypatch)

    widget.run()  # nothing open yet
    assert widget.worker is None and shown == ["open a 3D image layer first"]

    viewer.add_image(np.zeros((8, 8, 8), np.float32), name="blank")
    _run(qtbot, widget)
    assert shown[-1] == "layer 'blank': is blank: every voxel is 0"

    viewer.add_image(np.random.default_rng(0).random((8, 8, 8)), name="noise")
    widget._image.value = viewer.layers["noise"]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    widget._checkpoint.value = broken
    _run(qtbot, widget)
    assert str(broken) in shown[-1] and "checkpoint" in shown[-1]

    widget._checkpoint.value = tmp_path / "missing.pt"
    widget.run()
    assert widget.worker is None and shown[-1] == "choose a checkpoint file (.pt) first"
    assert [layer.name for layer in viewer.layers] == ["blank", "noise"]
    assert widget._run.enabled


def test_settings_persist_between_sessions(make_napari_viewer, qtbot, tiny_model, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(_scan_file(tmp_path)), plugin="napari-meshchop")
    _run(qtbot, _open_widget(viewer, tiny_model))
    again = SegmentWidget(viewer)
    assert again._model.value == CHECKPOINT and Path(again._checkpoint.value) == tiny_model
    assert again._device.value == "cpu"


def test_image_choices_follow_the_layer_list(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)  # undocked, as a script would use it
    assert widget._image.value is None and "open one (File > Open" in widget._geometry.value
    viewer.add_image(np.zeros((5, 5)), name="flat")
    viewer.add_image(np.zeros((5, 5, 5, 3)), name="rgb", rgb=True)
    assert widget._image.choices == (None,)
    vol = viewer.add_image(np.zeros((5, 6, 7)), name="vol", scale=(2, 1, 1))
    assert widget._image.value is vol and "2 x 1 x 1 mm" in widget._geometry.value
    other = viewer.add_image(np.zeros((5, 6, 7)), name="other")
    assert widget._image.value is vol  # a new scan does not take over the choice
    viewer.layers.remove(vol)
    assert widget._image.value is None  # ... nor does another scan when the chosen one goes
    assert other in widget._image.choices


@pytest.mark.slow
def test_real_scan_real_model_left_hemisphere_lesion(make_napari_viewer, qtbot,
                                                     real_segmentation):
    """The sample, opened from napari's menu and segmented by the widget's default model.

    The widget runs its whole path; only the network pass, when its weights and input are
    byte for byte those of the session's real segmentation, is replayed from it."""
    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-meshchop", "sub-M2265_T2w")
    widget = _open_widget(viewer)  # the default: pretrained MeshNet-26
    with network_memo.replaying(real_segmentation.memo) as memo:
        before = network_memo.hits(memo)
        _run(qtbot, widget, timeout_s=900)
        # The widget fed the network exactly the numbers that `meshchop segment` does.
        assert network_memo.hits(memo) == before + 1
    labels = viewer.layers["sub-M2265_T2w_lesion_meshnet26-arc-fold0"]
    _assert_overlays(labels, image)
    voxels = int(labels.data.sum())
    assert voxels == pytest.approx(85034, rel=0.002)  # what `meshchop segment` finds
    assert labels.metadata["lesion_ml"] == pytest.approx(85.0, abs=1.0)
    assert f"{labels.metadata['lesion_ml']:.1f} mL ({voxels} voxels)" in widget._result.value
    # Left hemisphere: the lesion's centroid lies well left of the brain's (RAS x smaller).
    ras = layers.WORLD_TO_RAS @ layers.data_to_world(
        image.scale, image.translate, image.rotate, image.shear, image.affine.affine_matrix)
    lesion_x = (ras @ [*np.argwhere(labels.data).mean(0), 1])[0]
    brain_x = (ras @ [*np.argwhere(np.asarray(image.data) > 20).mean(0), 1])[0]
    assert lesion_x < brain_x - 15
    # In the file's RAS voxel grid, as the CLI test reports it: x near 97 of 256.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(labels.data, ras))
    assert np.argwhere(np.asarray(canonical.dataobj)).mean(0)[0] == pytest.approx(97, abs=3)
    # Voxel for voxel the mask that the core writes for the same scan.
    cli = nib.as_closest_canonical(nib.load(real_segmentation.mask))
    np.testing.assert_allclose(canonical.affine, cli.affine, atol=1e-4)
    assert np.array_equal(np.asarray(canonical.dataobj), np.asarray(cli.dataobj))


def test_beside_a_real_napari_nifti(make_napari_viewer, qtbot, tiny_model, tmp_path):
    """With napari-nifti installed, both readers open the file and the masks agree."""
    require_module("napari_nifti", "napari-nifti, the other NIfTI plugin")
    viewer = make_napari_viewer()
    path = _scan_file(tmp_path)
    (ours,) = viewer.open(str(path), plugin="napari-meshchop")
    (theirs,) = viewer.open(str(path), plugin="napari-nifti", name="theirs")
    widget = _open_widget(viewer, tiny_model)
    for layer in (ours, theirs):
        widget._image.value = layer
        assert "assumed" not in widget._geometry.value
        _run(qtbot, widget)
        _assert_overlays(viewer.layers[f"{layer.name}_lesion_tiny"], layer)
    seen, masks = {}, {}
    for name, layer in (("ours", ours), ("theirs", theirs)):
        geometry = layers.resolve(layer.data.shape, layers.data_to_world(
            layer.scale, layer.translate, layer.rotate, layer.shear, layer.affine.affine_matrix),
            layer.metadata, [str(u) for u in layer.units])
        seen[name] = nib.as_closest_canonical(layers.to_nifti(layer.data, geometry))
        masks[name] = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(
            viewer.layers[f"{layer.name}_lesion_tiny"].data, geometry.affine)).dataobj)
    # The network gets the same voxels on the same grid (medvol rounds the file's float32
    # affine to ~1e-7 mm, which can tip an untrained model's ~0.5 outputs at a few voxels).
    assert np.allclose(seen["ours"].affine, seen["theirs"].affine, atol=1e-5)
    assert np.array_equal(seen["ours"].get_fdata(), seen["theirs"].get_fdata())
    assert np.mean(masks["ours"] != masks["theirs"]) < 0.01, np.mean(masks["ours"] != masks["theirs"])


def test_an_ensemble_of_checkpoints_segments_like_the_core(
        make_napari_viewer, qtbot, tiny_model, tmp_path, monkeypatch):
    from napari_meshchop.events import run
    from napari_meshchop.network.inference import segment
    from napari_meshchop.plugin.widgets.segment import ENSEMBLE, Source

    torch.manual_seed(1)
    other = checkpoint.from_model(MeshNet(Architecture(channels=3, dilations=(1, 2, 1))).eval(),
                                  PreprocessSpec(name="ras-minmax", shape=(32,) * 3))
    other_path = other.save(tmp_path / "other.pt")
    viewer = make_napari_viewer()
    path = _scan_file(tmp_path)
    (image,) = viewer.open(str(path), plugin="napari-meshchop")
    widget = _open_widget(viewer)
    shown = _errors(monkeypatch)

    widget._model.value = ENSEMBLE
    assert not widget._ensemble.native.isHidden() and widget._checkpoint.native.isHidden()
    widget._ensemble.value = [tiny_model]
    widget.run()  # one file is no ensemble
    assert widget.worker is None and "two or more checkpoint files" in shown[-1]

    widget._ensemble.value = [tiny_model, other_path]
    _run(qtbot, widget)
    labels = viewer.layers["scan_lesion_ensemble-2"]
    _assert_overlays(labels, image)
    assert labels.metadata["model"] == "ensemble of 2 (tiny.pt, other.pt)"
    assert "ensemble of 2" in widget._result.value
    # The same mask as the core's ensemble on the same voxels.
    img = layers.to_nifti(image.data, Source.of(image).geometry, "scan")
    expected = run(segment(img, [tiny_model, other_path], device="cpu")).mask
    np.testing.assert_array_equal(labels.data, expected)
    alone = run(segment(img, tiny_model, device="cpu")).mask
    assert not np.array_equal(expected, alone)

    again = SegmentWidget(viewer)  # the choice persists, files and all
    assert again._model.value == ENSEMBLE and not again._ensemble.native.isHidden()
    assert [Path(p) for p in again._ensemble.value] == [tiny_model, other_path]
    other_path.unlink()
    assert "other.pt: checkpoint file not found" in _choice_error(again)


def _choice_error(widget) -> str:
    from napari_meshchop.errors import MeshchopError

    try:
        widget.model_choice()
    except MeshchopError as exc:
        return str(exc)
    return ""
