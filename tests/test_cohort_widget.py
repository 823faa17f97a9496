"""The cohort panel, opened through the manifest, on the 4 mm example BIDS dataset."""

from __future__ import annotations

import json
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from bids_example import GOOD, bright_model
from napari.layers import Image, Labels
from qtpy.QtGui import QColor

from napari_meshchop.cohort import derivatives, find, run
from napari_meshchop.events import Progress
from napari_meshchop.plugin.widgets.cohort import CHECKPOINTS, COLUMNS, CohortPanel
from napari_meshchop.plugin.widgets.evaluate import NumberItem


@pytest.fixture(autouse=True)
def _isolated(isolated_settings):
    """QSettings in tmp_path (conftest)."""


@pytest.fixture(scope="module")
def dataset(real_data, tmp_path_factory):
    import bids_example

    return bids_example.build(tmp_path_factory.mktemp("bids") / "ds", 4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return bright_model(tmp_path_factory.mktemp("models") / "bright.pt", 0.5)


def open_panel(make_napari_viewer, dataset, model, out):
    viewer = make_napari_viewer()
    _, panel = viewer.window.add_plugin_dock_widget("napari-meshchop", "Segment a cohort")
    assert isinstance(panel, CohortPanel)
    panel._source.value = dataset
    panel._output.value = out
    panel._model.value = CHECKPOINTS
    panel._checkpoints.value = [str(model)]
    panel._device.value = "cpu"
    return viewer, panel


def rows(panel) -> dict:
    """{image key: (lesion mL, components, status)} from the table's cells."""
    found = {}
    for row in range(panel.table.rowCount()):
        cells = [panel.table.item(row, c) for c in range(len(COLUMNS))]
        found[cells[0].text()] = tuple(c.value() if isinstance(c, NumberItem) else c.text()
                                       for c in cells[1:])
    return found


def test_the_table_fills_with_each_image_and_a_row_opens_its_scan_and_mask(
        make_napari_viewer, qtbot, dataset, model, tmp_path):
    out = tmp_path / "out"
    viewer, panel = open_panel(make_napari_viewer, dataset, model, out)
    panel.toggle()
    assert panel._run.text == "Stop" and not panel.inputs.enabled
    qtbot.waitUntil(lambda: panel.worker is None, timeout=120_000)
    table = rows(panel)
    assert len(table) == 5
    for record in panel.records:
        side = derivatives.read_json(derivatives.outputs(record.image, out).sidecar)
        if record.ok:
            assert table[record.image.key] == (pytest.approx(side["LesionVolumeML"], abs=0.01),
                                               side["ConnectedComponents"], "done")
    broken = next(r for r in range(panel.table.rowCount())
                  if panel.table.item(r, 3).text() == "failed")
    assert "truncated" in panel.table.item(broken, 3).toolTip()
    assert panel.table.item(broken, 3).foreground().color() == QColor("red")
    assert panel._report.enabled and panel.report == out / "report.html"
    assert "Done: 4 of 5 images segmented, 1 failed" in panel._status.value
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == \
        "derivative"

    # The reoriented copy (PSR voxel order): its scan and mask, aligned in the world.
    key = GOOD[3].removesuffix(".nii.gz")
    row = next(r for r in range(panel.table.rowCount()) if panel.table.item(r, 0).text() == key)
    panel.table.selectRow(row)
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=30_000)
    scan, mask = viewer.layers
    assert isinstance(scan, Image) and isinstance(mask, Labels)
    np.testing.assert_allclose(scan.affine.affine_matrix, mask.affine.affine_matrix)
    np.testing.assert_allclose(scan.scale, mask.scale)
    written = nib.load(derivatives.outputs(panel.record_at(row).image, out).mask)
    assert mask.data.sum() == (np.asarray(written.dataobj) > 0).sum() > 100
    # Another row replaces them: the truncated file has nothing to show, and says why.
    panel.table.selectRow(broken)
    qtbot.waitUntil(lambda: len(viewer.layers) == 0, timeout=30_000)
    assert "failed: " in panel._status.value and "truncated" in panel._status.value


def hold_the_second_image(monkeypatch):
    """The first image as usual; the second idles (yielding) until the run is stopped.
    Returns the real predict."""
    real, first = run.Segmenter.predict, threading.Event()

    def held(self, volume, stop=None):
        if not first.is_set():
            first.set()
            return (yield from real(self, volume, stop))
        while not stop.is_set():
            yield Progress("network", 0, 1, "held")
            time.sleep(0.05)
        return (yield from real(self, volume, stop))

    monkeypatch.setattr(run.Segmenter, "predict", held)
    return real


def test_stop_keeps_finished_images_and_run_again_resumes(
        make_napari_viewer, qtbot, dataset, model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _, panel = open_panel(make_napari_viewer, dataset, model, out)
    real = hold_the_second_image(monkeypatch)
    panel.toggle()
    qtbot.waitUntil(lambda: len(panel.records) >= 1, timeout=60_000)
    panel.toggle()  # Stop
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert "Stopped after" in panel._status.value and panel._run.text == "Run"
    first = {r.image.key for r in panel.records if r.ok}
    assert 1 <= len(first) < 4
    monkeypatch.setattr(run.Segmenter, "predict", real)
    panel.toggle()  # Run again: resumes
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    table = rows(panel)
    assert len(table) == 5
    assert all(table[key][2] == "done earlier" for key in first)
    assert sum(status == "done" for _, _, status in table.values()) == 4 - len(first)


def test_closing_the_panel_stops_its_run_and_keeps_whole_images(
        make_napari_viewer, qtbot, dataset, model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    viewer, panel = open_panel(make_napari_viewer, dataset, model, out)
    hold_the_second_image(monkeypatch)
    panel.toggle()
    worker = panel.worker
    qtbot.waitUntil(lambda: len(panel.records) >= 1, timeout=60_000)
    viewer.window.remove_dock_widget(panel.native)  # what the dock's close button does
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert not worker.is_running and panel.closed
    for image in find.bids_images(dataset).images:  # each image done whole, or not at all
        where = derivatives.outputs(image, out)
        if where.sidecar.exists():
            assert where.mask.is_file() and where.mosaic.is_file()
    assert not (out / "lesions.tsv").exists()  # the group level never ran
