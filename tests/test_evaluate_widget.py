"""The Evaluate widget, opened through the manifest, on a tiny local ARC cohort."""

from __future__ import annotations

import csv
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QTableWidget

from napari_meshchop import events
from napari_meshchop.data import folds, manifest
from napari_meshchop.evaluation import evaluate
from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.network import checkpoint
from napari_meshchop.network.model import Architecture, MeshNet
from napari_meshchop.plugin.widgets.evaluate import (
    CHECKPOINTS,
    COLUMNS,
    EvaluateWidget,
    NumberItem,
)

KEYS = [key for _, key, _ in COLUMNS]


@pytest.fixture(autouse=True)
def _isolated(isolated_settings):
    """QSettings in tmp_path (conftest)."""


@pytest.fixture(scope="module")
def lesion_finder(tmp_path_factory) -> Path:
    """A one-block MeshNet that calls the replica's bright lesions lesion (input > 0.8):
    Dice well above 0 and different for every subject, unlike an untrained model."""
    model = MeshNet(Architecture(channels=1, dilations=(1,)))
    with torch.no_grad():
        conv = model.blocks[0].conv
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1, 1] = 1.0
        conv.bias.zero_()
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[1, 0] = 20.0
        model.head.bias[1] = -16.0
    ckpt = checkpoint.from_model(model.eval(), PreprocessSpec("ras-minmax", shape=(32, 32, 32)),
                                 note="threshold at 0.8")
    return ckpt.save(tmp_path_factory.mktemp("models") / "lesion_finder.pt")


def open_widget(make_napari_viewer, data, models, outer=0):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop", "Evaluate MeshNet")
    assert isinstance(widget, EvaluateWidget)
    widget._model.value = CHECKPOINTS
    widget._checkpoints.value = [str(m) for m in models]
    widget._data.value = data
    widget._outer.value = outer
    widget._device.value = "cpu"
    return viewer, widget


def run_to_end(widget, qtbot):
    widget.toggle()
    assert widget._run.text == "Stop"
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget._run.text == "Run"


def cell(widget, row, key):
    item = widget.table.item(row, KEYS.index(key))
    return item.value() if isinstance(item, NumberItem) else item.text()


def column(widget, key):
    return [cell(widget, row, key) for row in range(widget.table.rowCount())]


def core_results(data, models, ids):
    return {r.subject: r for r in events.run(evaluate.evaluate(
        [str(m) for m in models], data, ids, "cpu"))}


def test_table_sorts_summarises_exports_and_shows_aligned_layers(
        make_napari_viewer, qtbot, data, lesion_finder, tmp_path):
    viewer, widget = open_widget(make_napari_viewer, data, [lesion_finder])
    run_to_end(widget, qtbot)
    ids = folds.load(data).outer[0].test
    core = core_results(data, [lesion_finder], ids)

    # One row per test subject, with the core's own numbers.
    assert sorted(column(widget, "subject")) == sorted(ids)
    for row in range(widget.table.rowCount()):
        record = core[cell(widget, row, "subject")]
        assert cell(widget, row, "acquisition") == record.acquisition
        for key in ("true_ml", "pred_ml", "dice", "macro_dice", "avd", "mcc"):
            assert cell(widget, row, key) == record.scores[key], key
        assert cell(widget, row, "error") == ""
    assert len({r.scores["dice"] for r in core.values()}) == len(ids) and all(
        r.scores["dice"] > 0.5 for r in core.values())
    assert "Done: 2 subjects" in widget._status.value

    # Clicking the Dice header sorts by the numbers.
    dice = KEYS.index("dice")
    by_dice = sorted(core, key=lambda s: core[s].scores["dice"])
    widget.table.sortByColumn(dice, Qt.SortOrder.DescendingOrder)
    assert column(widget, "subject") == by_dice[::-1]
    widget.table.sortByColumn(dice, Qt.SortOrder.AscendingOrder)
    assert column(widget, "subject") == by_dice

    # The summary line: mean +/- SD, median and IQR of the core's summary.
    stats = evaluate.summary(list(core.values()))
    text = widget._summary.value
    for name, key in (("Dice", "dice"), ("MCC", "mcc")):
        s = stats[key]
        assert (f"{name:<10}  {s['mean']:.3f} ± {s['sd']:.3f}   median {s['median']:.3f} "
                f"(IQR {s['q1']:.3f}-{s['q3']:.3f})") in text

    # Export: every column of SubjectResult.to_row, values that read back exactly.
    out = widget.export_csv(tmp_path / "eval.csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(next(iter(core.values())).to_row())
    assert sorted(r["subject"] for r in rows) == sorted(ids)
    for r in rows:
        assert float(r["dice"]) == core[r["subject"]].scores["dice"]
        assert float(r["mcc"]) == core[r["subject"]].scores["mcc"]
        assert Path(r["prediction"]).is_file()

    # The main scores fit the dock's width: no sideways scrolling; the rest on demand.
    assert widget.shown_columns() == ["Subject", "Dice", "Macro Dice", "AVD", "MCC"]
    viewer.window._qt_window.resize(1600, 1000)
    viewer.window._qt_window.show()
    qtbot.wait(100)
    assert widget.table.horizontalScrollBar().maximum() == 0
    widget.show_column("Acquisition")
    assert "Acquisition" in widget.shown_columns()

    # Selecting a row opens the scan, the truth and the prediction, aligned; another row
    # replaces them (one subject is stored in PSR voxel order, the other in RAS); the view
    # fits that subject, whatever else is open.
    elsewhere = viewer.add_image(np.zeros((10, 10, 10)), name="elsewhere", scale=(30, 30, 30),
                                 translate=(500, 500, 500))
    for row in (0, 1):
        widget.table.selectRow(row)
        subject = cell(widget, row, "subject")
        qtbot.waitUntil(lambda s=subject: [lay.name for lay in viewer.layers] == [
            "elsewhere", f"{s} scan", f"{s} prediction", f"{s} truth"], timeout=30_000)
        assert_aligned(viewer, core[subject], viewer.layers[1:])
        assert subject in widget._status.value
        scan = viewer.layers[f"{subject} scan"]
        middle = scan.extent.world.mean(axis=0)[list(viewer.dims.displayed)]
        camera = getattr(viewer, "scene", viewer).camera  # napari 0.9 moved it
        np.testing.assert_allclose(camera.center[-2:], middle, atol=2)
    viewer.layers.remove(elsewhere)


def assert_aligned(viewer, record, shown=None):
    scan, prediction, truth = viewer.layers if shown is None else shown
    assert isinstance(scan, Image) and isinstance(truth, Labels)
    assert isinstance(prediction, Labels)
    assert truth.colormap.map(1).tolist() != prediction.colormap.map(1).tolist()
    np.testing.assert_allclose(scan.affine.affine_matrix @ _matrix(scan),
                               truth.affine.affine_matrix @ _matrix(truth))
    # Each predicted lesion voxel, taken to world space and into the truth layer, lands on
    # the voxel the core compared it with: the share inside the truth is the precision.
    voxels = np.argwhere(np.asarray(prediction.data) == 1)
    assert len(voxels) > 10
    world = np.array([prediction.data_to_world(v) for v in voxels])
    inside = np.rint([truth.world_to_data(w) for w in world]).astype(int)
    hits = np.asarray(truth.data)[tuple(inside.T)]
    assert hits.mean() == pytest.approx(record.scores["precision"], abs=0.02)
    # ... and the view moved to a slice through the true lesion.
    centre = np.rint(truth.world_to_data(viewer.dims.point)).astype(int)
    assert np.asarray(truth.data)[tuple(centre)] == 1


def _matrix(layer):
    from napari_meshchop.plugin.layers import data_to_world

    return data_to_world(layer.scale, layer.translate, layer.rotate, layer.shear)


def test_ensemble_and_inner_fold(make_napari_viewer, qtbot, data, lesion_finder,
                                 tiny_checkpoint):
    models = [lesion_finder, tiny_checkpoint]
    _, widget = open_widget(make_napari_viewer, data, models, outer=1)
    widget._part.value = "val"
    widget._inner.value = 1
    run_to_end(widget, qtbot)
    ids = folds.load(data).outer[1].inner[1].val
    core = core_results(data, models, ids)
    assert sorted(column(widget, "subject")) == sorted(ids)
    for row in range(widget.table.rowCount()):
        assert cell(widget, row, "dice") == core[cell(widget, row, "subject")].scores["dice"]


def test_stop_keeps_finished_rows(make_napari_viewer, qtbot, data, lesion_finder,
                                  monkeypatch):
    real = evaluate.evaluate
    pressed = threading.Event()

    def held_after_first(*args, **kwargs):
        """The real job, held after its first subject until Stop was pressed."""
        job = real(*args, **kwargs)
        while True:
            try:
                event = next(job)
            except StopIteration as done:
                return done.value
            yield event
            if isinstance(event, evaluate.SubjectResult):
                pressed.wait(timeout=30)

    monkeypatch.setattr(evaluate, "evaluate", held_after_first)
    _, widget = open_widget(make_napari_viewer, data, [lesion_finder])
    widget.toggle()
    qtbot.waitUntil(lambda: widget.table.rowCount() == 1, timeout=60_000)
    widget.toggle()  # Stop
    assert widget._run.text == "Stopping..."
    pressed.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.table.rowCount() == 1 and len(widget.results) == 1
    assert widget.results[0].ok and cell(widget, 0, "dice") > 0.5
    assert "Stopped after 1 of 2" in widget._status.value
    assert widget._run.text == "Run" and widget._run.enabled
    assert "1 subjects scored" in widget._summary.value


def test_damaged_subject_shows_its_error_and_the_others_go_on(
        make_napari_viewer, qtbot, data, lesion_finder, tmp_path):
    folder = Path(shutil.copytree(data, tmp_path / "arc"))
    ids = folds.load(folder).outer[0].test
    damaged = manifest.load(folder).pair(ids[0])
    image = folder / damaged.image
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    for cached in (folder / "cache").glob(f"{damaged.id}.*.npz"):
        cached.unlink()

    viewer, widget = open_widget(make_napari_viewer, folder, [lesion_finder])
    run_to_end(widget, qtbot)
    assert widget.table.rowCount() == 2
    rows = {cell(widget, r, "subject"): r for r in range(2)}
    bad, good = rows[ids[0]], rows[ids[1]]
    assert damaged.image.split("/")[-1] in cell(widget, bad, "error")
    assert math.isnan(cell(widget, bad, "dice")) and widget.table.item(
        bad, KEYS.index("dice")).text() == ""
    assert cell(widget, good, "error") == "" and cell(widget, good, "dice") > 0.5
    assert "1 failed" in widget._status.value and "1 failed" in widget._summary.value
    with open(widget.export_csv(tmp_path / "eval.csv"), newline="") as fh:
        exported = {r["subject"]: r for r in csv.DictReader(fh)}
    assert exported[ids[0]]["dice"] == exported[ids[0]]["tp"] == ""
    assert exported[ids[0]]["error"] == cell(widget, bad, "error")
    assert float(exported[ids[1]]["dice"]) == cell(widget, good, "dice")

    # Its row still opens what can be read, and says what cannot.
    widget.table.selectRow(bad)
    qtbot.waitUntil(lambda: len(widget.shown) == 1, timeout=30_000)
    assert [lay.name for lay in viewer.layers] == [f"{damaged.id} truth"]
    assert "truncated or corrupt" in widget._status.value


def test_refuses_bad_inputs_and_remembers_settings(make_napari_viewer, data, lesion_finder,
                                                   tmp_path):
    viewer, widget = open_widget(make_napari_viewer, data, [])
    widget.toggle()
    assert widget.worker is None and "choose one checkpoint" in widget._status.value
    widget._checkpoints.value = [str(lesion_finder)]
    widget._data.value = tmp_path
    widget.toggle()
    assert widget.worker is None and "manifest.json" in widget._status.value
    assert "Download ARC cohort" in widget._status.value  # what to do, in napari
    assert "meshchop " not in widget._status.value  # ... not a command to type
    widget._data.value = data
    widget._outer.value = 5
    widget.toggle()
    assert widget.worker is None and "outer fold 5 does not exist" in widget._status.value

    widget._outer.value = 1
    widget._part.value = "val"
    widget._inner.value = 1
    widget._save_settings()
    again = EvaluateWidget(viewer)
    assert again._model.value == CHECKPOINTS
    assert again._checkpoints.value == (Path(lesion_finder),)
    assert Path(again._data.value) == Path(data)
    assert (again._outer.value, again._part.value, again._inner.value) == (1, "val", 1)
    assert again._inner.enabled


def test_numbers_sort_as_numbers_and_blanks_go_last(qtbot):
    table = QTableWidget(4, 1)
    for row, value in enumerate([10.0, 9.0, math.nan, 100.0]):
        table.setItem(row, 0, NumberItem(value, "{:.1f}"))
    qtbot.addWidget(table)
    table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
    assert [table.item(r, 0).text() for r in range(4)] == ["9.0", "10.0", "100.0", ""]
    table.sortByColumn(0, Qt.SortOrder.DescendingOrder)
    assert [table.item(r, 0).text() for r in range(4)] == ["100.0", "10.0", "9.0", ""]
