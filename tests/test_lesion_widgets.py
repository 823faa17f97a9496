"""Correcting a lesion in napari: the statistics panel (live after paint and erase, jump,
delete, CSV), saving a corrected mask, adding it to a training set, the threshold slider on
P(lesion), and the Fine-tune section. One slow test does it all on the real scan."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import synthetic_corrections as synthetic
from napari.layers import Labels
from scipy import ndimage

from napari_meshchop import events
from napari_meshchop.data import corrections, folds, manifest
from napari_meshchop.evaluation.lesions import lesion_stats
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network import registry
from napari_meshchop.network.inference import segment
from napari_meshchop.plugin.reader import read_layer
from napari_meshchop.plugin.widgets.finetune import FinetuneSection
from napari_meshchop.plugin.widgets.lesions import LesionPanel, geometry_of
from napari_meshchop.plugin.widgets.segment import CHECKPOINT
from napari_meshchop.plugin.widgets.threshold import ThresholdControl

# LIA voxels, as conformed scans: the reader reorders them, so "on the scan's grid" is tested.
LIA = np.array([[-1.0, 0, 0, 20], [0, 0, 1.0, -15], [0, -1.0, 0, 18], [0, 0, 0, 1]])


@pytest.fixture(autouse=True)
def _isolated(isolated_settings):
    """The widgets' QSettings in tmp_path (conftest)."""


def _files(tmp_path):
    """A scan with a lesion mask of three components (36, 8 and 1 voxels) beside it."""
    image, _, _ = synthetic.scan((30, 28, 26), seed=5)
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[4:8, 5:8, 6:9] = 1  # 36 voxels: low voxel x index, so the patient's right (LIA)
    mask[22:24, 10:12, 10:12] = 1  # 8 voxels, left
    mask[15, 20, 20] = 1  # 1 voxel
    scan, lesion = tmp_path / "sub-07_T2w.nii.gz", tmp_path / "sub-07_lesion.nii.gz"
    nib.save(nib.Nifti1Image(image, LIA), scan)
    nib.save(nib.Nifti1Image(mask, LIA), lesion)
    return scan, lesion, mask


def _open(viewer, tmp_path):
    scan, lesion, mask = _files(tmp_path)
    (image,) = viewer.open(str(scan), plugin="napari-meshchop")
    data, kwargs, _ = read_layer(lesion)
    labels = viewer.add_labels(data, **{**kwargs, "name": "sub-07_T2w lesion"})
    _, panel = viewer.window.add_plugin_dock_widget("napari-meshchop", "Lesion statistics")
    return image, labels, panel, scan, mask


def test_panel_shows_live_statistics_jumps_and_deletes(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    image, labels, panel, _, mask = _open(viewer, tmp_path)
    assert isinstance(panel, LesionPanel)
    assert panel.layer is labels and panel._scan.value is image  # named like its scan
    expected = lesion_stats(mask, LIA, np.asarray(nib.load(tmp_path / "sub-07_T2w.nii.gz")
                                                  .dataobj))
    assert [c.voxels for c in panel.stats.components] == [36, 8, 1]
    for shown, truth in zip(panel.stats.components, expected.components):
        np.testing.assert_allclose(shown.centroid_mm, truth.centroid_mm, atol=1e-6)
        assert shown.side == truth.side
    assert panel.table.data[0] == [1, 0.036, 80.0, *[round(v, 1) for v in
                                                      expected.components[0].centroid_mm],
                                   expected.components[0].side]
    # Paint: a new component far from the others; the table follows once edits pause.
    labels.data_setitem((np.array([1, 1]), np.array([1, 1]), np.array([1, 2])), 1)
    qtbot.waitUntil(lambda: len(panel.stats.components) == 4, timeout=5000)
    assert labels.metadata["edited"] is True
    # Jump: the view slices through the component's centroid.
    panel.table.native.cellClicked.emit(1, 0)
    world = labels.data_to_world(panel.stats.components[1].centroid_voxel)
    np.testing.assert_allclose(viewer.dims.point, world, atol=0.51)
    # Delete the 8-voxel component: one undoable edit.
    panel.table.native.setCurrentCell(1, 0)
    panel._delete.clicked.emit()
    assert [c.voxels for c in panel.stats.components] == [36, 2, 1]
    labels.undo()
    qtbot.waitUntil(lambda: len(panel.stats.components) == 4, timeout=5000)
    # CSV: the table's numbers, checked against scipy's own labelling of the layer.
    written = panel.export_csv(tmp_path / "components.csv")
    rows = list(csv.DictReader(written.read_text().splitlines()))
    _, n = ndimage.label(np.asarray(labels.data) > 0, structure=np.ones((3, 3, 3)))
    assert len(rows) == n == 4 and [int(r["voxels"]) for r in rows] == [36, 8, 2, 1]


def test_save_and_add_to_the_training_set_on_the_scans_grid(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, labels, panel, scan, mask = _open(viewer, tmp_path)
    labels.metadata = {**labels.metadata, "model": "meshnet26-arc-fold0", "threshold": 0.4}
    panel.table.native.setCurrentCell(2, 0)
    panel.delete(panel.selected())  # the 1-voxel component
    expected = mask.copy()
    expected[15, 20, 20] = 0
    written, sidecar = panel.save(tmp_path / "out" / "fixed.nii.gz")
    saved = nib.load(written)
    np.testing.assert_array_equal(saved.affine, LIA)  # the file's own grid and voxel order
    np.testing.assert_array_equal(np.asarray(saved.dataobj), expected)
    doc = json.loads(sidecar.read_text())
    assert doc["source_scan"] == str(scan) and doc["edited"] is True
    assert doc["model"] == "meshnet26-arc-fold0" and doc["threshold"] == 0.4
    assert doc["model_sha256"] == registry.REGISTRY["meshnet26-arc-fold0"].sha256
    data = tmp_path / "mine"
    added = panel.add_to_training_set(data)
    pair = manifest.load(data).pair(added.pair.id)
    assert (data / pair.image).read_bytes() == scan.read_bytes()  # the scan file, as it is
    np.testing.assert_array_equal(np.asarray(nib.load(data / pair.mask).dataobj), expected)
    again = panel.add_to_training_set(data)  # the same scan: its pair replaced
    assert again.replaced == [added.pair.id] and again.pairs == 1


def test_threshold_slider_redraws_the_mask_from_the_probability(make_napari_viewer,
                                                                tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()
    scan, _, _ = _files(tmp_path)
    (image,) = viewer.open(str(scan), plugin="napari-meshchop")
    img = nib.Nifti1Image(np.asarray(image.data, dtype=np.float32), geometry_of(image).affine)
    result = events.run(segment(img, str(tiny_checkpoint), "cpu"))
    assert result.probability.dtype == np.float32 and result.probability.shape == img.shape
    np.testing.assert_array_equal(result.mask, result.probability > 0.5)
    transform = {k: getattr(image, k) for k in ("scale", "translate", "rotate", "shear")}
    labels = viewer.add_labels(result.mask, name="scan lesion", **transform)
    control = ThresholdControl(viewer)
    prob = control.show(result, labels, transform, model=str(tiny_checkpoint))
    assert not prob.visible and prob.name == "scan lesion_probability"
    assert labels.metadata["model_sha256"] == corrections.model_sha256(tiny_checkpoint)
    low = float(np.quantile(result.probability, 0.3))
    control.slider.value = round(low, 2)
    np.testing.assert_array_equal(labels.data, result.probability > control.slider.value)
    assert labels.metadata["threshold"] == control.slider.value
    assert labels.data.sum() != result.mask.sum()
    viewer.layers.remove(prob)
    assert not control.slider.enabled


def test_finetune_section_trains_shows_before_after_and_offers_it(
        make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()
    _, segment_widget = viewer.window.add_plugin_dock_widget("napari-meshchop",
                                                             "Segment stroke lesion")
    data = tmp_path / "mine"
    for i in range(3):
        corrections.add(data, *synthetic.scan_file(tmp_path, f"sub-{i}_T2w", i))
    section = FinetuneSection(viewer)
    section._model.value = CHECKPOINT
    section._checkpoint.value = tiny_checkpoint
    section._data.value = data
    section._out.value = tmp_path / "run"
    section.settings.fields["crop"].value = 16
    section.settings.fields["device"].value = "cpu"
    section.settings.fields["epochs"].value = 2
    section.toggle()  # Start ...
    assert section._start.text == "Stop"
    section.toggle()  # ... and Stop at once: it ends after its first step
    qtbot.waitUntil(lambda: section.worker is None, timeout=120_000)
    assert section.result.training.stopped and section.result.training.step == 1
    assert list(section.table.data) == [] and segment_widget._model.value != CHECKPOINT
    section._resume.value = True
    section.toggle()
    qtbot.waitUntil(lambda: section.worker is None, timeout=120_000)
    result = section.result
    assert result.training.step == 2 * len(folds.load(data).ids(0, "train"))
    held_out = folds.load(data).ids(0, "test")
    assert not result.training.stopped and result.held_out == held_out
    assert [row[0] for row in section.table.data] == [*held_out, "mean"]
    assert "Held-out lesion Dice" in section._status.value
    # Offered as a Model choice, labelled; nothing chosen for the user.
    offered = [c for c in segment_widget._model.choices if getattr(c, "path", None)]
    assert [o.path for o in offered] == [str(result.checkpoint)]
    assert offered[0].label.startswith("fine-tuned: run run")
    assert segment_widget._model.value != offered[0]
    assert ckpt_io.load(result.checkpoint).training["config"]["lr"] == 1e-4


@pytest.mark.slow
def test_real_scan_correct_save_add_finetune_and_segment(make_napari_viewer, qtbot,
                                                         tmp_path, real_data):
    """The loop on the ARC sample: the pretrained mask, its smaller component deleted in
    the panel, saved, added to a training set, fine-tuned one step on a 32^3 crop; the new
    checkpoint loads and segments (on a crop of the network grid, to keep this cheap)."""
    from napari_meshchop.imaging.preprocess import prepare, prepare_mask
    from napari_meshchop.network.inference import FusedMeshNet
    from napari_meshchop.network.registry import DEFAULT_MODEL
    from napari_meshchop.training.finetune import finetune, finetune_config

    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-meshchop", "sub-M2265_T2w")
    _, segment_widget = viewer.window.add_plugin_dock_widget("napari-meshchop",
                                                             "Segment stroke lesion")
    segment_widget._device.value = "cpu"
    segment_widget.run()
    qtbot.waitUntil(lambda: segment_widget.worker is None, timeout=1_200_000)
    (labels,) = [lay for lay in viewer.layers if isinstance(lay, Labels)]
    viewer.layers.selection.active = labels
    _, panel = viewer.window.add_plugin_dock_widget("napari-meshchop", "Lesion statistics")
    assert panel.layer is labels and panel._scan.value is image
    before = [c.voxels for c in panel.stats.components]
    assert len(before) >= 2 and panel.stats.components[0].side == "left"
    panel.table.native.setCurrentCell(len(before) - 1, 0)
    panel.delete(panel.selected())  # the smallest component
    assert [c.voxels for c in panel.stats.components] == before[:-1]
    written, _ = panel.save(tmp_path / "M2265_corrected.nii.gz")
    saved = np.asarray(nib.load(written).dataobj)
    assert int(saved.sum()) == sum(before[:-1])
    added = panel.add_to_training_set(tmp_path / "mine")
    assert added.pair.lesion_voxels == int(saved.sum()) and added.folds is None
    config = finetune_config(DEFAULT_MODEL, tmp_path / "mine", None, epochs=1, crop=32,
                             lesion_crop_share=1.0, device="cpu")
    result = events.run(finetune(config, tmp_path / "run"))
    assert result.training.step == 1
    new = ckpt_io.load(result.checkpoint)
    assert new.provenance["fine_tuned_from"] == DEFAULT_MODEL
    # It segments: on a 48^3 crop of the network grid at the lesion's centre, the new and
    # the old network agree closely (one step at lr 1e-4 moves little).
    old = ckpt_io.load(real_data / "arc-meshchop_meshnet26_fold0_restart0.pt")
    img = nib.load(real_data / "sub-M2265_T2w.nii.gz")
    img = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine)
    volume = prepare(img, new.preprocess).volume
    truth = prepare_mask(nib.Nifti1Image(saved, img.affine), img, new.preprocess)
    crop = tuple(slice(c - 24, c + 24) for c in np.argwhere(truth).mean(0).astype(int))
    masks = [events.run(FusedMeshNet(c.build()).lesion_probability(volume[crop])) > 0.5
             for c in (old, new)]
    assert min(m.sum() for m in masks) > 5000  # a lesion in both
    dice = 2 * (masks[0] & masks[1]).sum() / (masks[0].sum() + masks[1].sum())
    assert dice > 0.9, dice
